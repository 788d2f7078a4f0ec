from promoe.smoke import main


def test_readme_smoke_run_lowers_the_loss_and_backends_agree(capsys):
    main(["--steps", "6", "--batch", "8"])  # exits non-zero (SystemExit) on failure
    assert "smoke run OK" in capsys.readouterr().out
