"""Impossible inputs stop with a message that names the key or option and where it was given, never a traceback
or a silent wrong result: model overrides, optimiser numbers, the sampling CLI, evaluation."""

import numpy as np
import pytest

from promoe.sample import parse_args
from promoe.sampling import load_model
from promoe.train_config import load_config
from tests.test_checkpoint_config import tiny_config


@pytest.mark.parametrize("override, message", [
    ("depth=0", "depth: must be >= 1, got 0"),
    ("hidden_size=-6", "hidden_size: must be >= 1, got -6"),
    ("num_heads=0", "num_heads: must be >= 1, got 0"),
    ("patch_size=0", "patch_size: must be >= 1, got 0"),
    ("num_heads=5", "num_heads: hidden_size=32 is not divisible by num_heads=5"),
    ("class_dropout_prob=2", r"class_dropout_prob: must lie in \[0, 1\), got 2.0"),
    ("capacity_factor=0", "capacity_factor: must be > 0"),
    ("capacity_factor=-1", "capacity_factor: must be > 0"),
    ("mlp_ratio=.nan", "mlp_ratio: must be a finite number"),
    ("depth=2.5", "depth: expected int, got 2.5"),
])
def test_an_impossible_model_override_is_refused_naming_the_key_and_the_command_line(override, message):
    config = tiny_config("model.name=ProMoE-EC-S", f"model.overrides.{override}")
    with pytest.raises(ValueError, match=rf"^model: {message}.* \(on the command line\)$"):
        config.validate(world_size=1, source="configs/demo.yaml")


def test_a_value_from_the_file_is_reported_with_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  overrides:\n    depth: 0\noptim:\n  lr: 0\n")
    config = load_config(path)
    with pytest.raises(ValueError, match=r"optim.lr must be a finite number > 0, got 0.0 \(in .*run.yaml\)"):
        config.validate(world_size=1, source=str(path))
    config = load_config(path, ["optim.lr=1e-4"])
    with pytest.raises(ValueError, match=r"model: depth: must be >= 1, got 0 \(in .*run.yaml\)"):
        config.validate(world_size=1, source=str(path))
    with pytest.raises(ValueError, match=r"expected float, got 'fast' \(on the command line\)"):
        load_config(path, ["optim.lr=fast"])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "optim.lr must be a finite number > 0, got 0.0"),
    ("optim.lr=-1e-4", "optim.lr must be a finite number > 0"),
    ("optim.lr=.inf", "optim.lr must be a finite number > 0, got inf"),
    ("optim.betas=[0.9, 1.0]", r"optim.betas must be two numbers in \[0, 1\)"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a finite number >= 0"),
    ("optim.grad_clip=0", "optim.grad_clip must be > 0"),
    ("train.ema_decay=1.5", r"train.ema_decay must be in \[0, 1\]"),
    ("train.grid_cfg_scale=.nan", "train.grid_cfg_scale must be a finite number >= 1"),
    ("train.steps=0", "train.steps must be >= 1"),
])
def test_an_impossible_optimiser_or_training_number_is_refused(override, message):
    with pytest.raises(ValueError, match=rf"^{message}.* \(on the command line\)$"):
        tiny_config(override).validate(world_size=1, source="configs/demo.yaml")


@pytest.mark.parametrize("option, message", [
    (["--cfg-scale", "nan"], "--cfg-scale nan: a guidance scale is a finite number >= 1"),
    (["--cfg-scale", "1.5", "inf"], "--cfg-scale inf"),
    (["--cfg-scale", "0.5"], "--cfg-scale 0.5: a guidance scale is a finite number >= 1 \\(1: no guidance\\)"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--num-images", "0"], "--num-images must be >= 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be >= 1"),
])
def test_the_sampling_cli_refuses_settings_that_would_write_useless_images(option, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--ckpt", "x", *option])
    assert stop.value.code == 2 and message.replace("\\", "") in capsys.readouterr().err
    assert parse_args(["--ckpt", "x", "--cfg-scale", "1", "3"]).cfg_scale == [1.0, 3.0]


def test_model_is_refused_for_a_checkpoint_that_records_its_model(tmp_path):
    from promoe.sample import main
    from promoe.weights import save_weights
    from promoe.zoo import build_from_config

    config = tiny_config()
    model = build_from_config(config.model_config())
    save_weights(tmp_path / "ema.safetensors", model.state_dict(), model.config, config)
    with pytest.raises(ValueError, match="--model ProMoE-XL: .* records the model it holds"):
        load_model(tmp_path / "ema.safetensors", "ProMoE-XL")
    with pytest.raises(SystemExit, match="^error: --model ProMoE-XL"):
        main(["--ckpt", str(tmp_path / "ema.safetensors"), "--model", "ProMoE-XL", "--out", str(tmp_path / "s")])


def reference_stats(path, **damaged) -> None:
    """A small reference .npz in the evaluator's layout (pool features included), with arrays replaced."""
    rng = np.random.default_rng(3)
    arrays = dict(mu=rng.normal(size=4), sigma=np.eye(4), mu_s=rng.normal(size=3), sigma_s=np.eye(3),
                  pool=rng.normal(size=(5, 4)).astype(np.float32))
    np.savez(path, **{**arrays, **damaged})


@pytest.mark.parametrize("key", ["mu", "sigma", "sigma_s", "pool"])
def test_reference_statistics_or_features_holding_nan_or_inf_are_refused_naming_the_array(tmp_path, key):
    from promoe.eval.reference import read_reference

    reference_stats(tmp_path / "fine.npz")
    assert read_reference(tmp_path / "fine.npz").pool.shape == (5, 4)
    with np.load(tmp_path / "fine.npz") as fine:
        damaged = fine[key].astype(np.float64)
    damaged.flat[1] = np.nan if key != "sigma" else np.inf
    reference_stats(tmp_path / "ref.npz", **{key: damaged})
    with pytest.raises(ValueError, match=rf"ref.npz: '{key}' holds 1 NaN or infinite values"):
        read_reference(tmp_path / "ref.npz")


def test_evaluate_exits_with_a_message_on_a_damaged_reference_or_a_non_finite_metric(tmp_path, monkeypatch):
    import promoe.evaluate

    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    reference_stats(tmp_path / "ref.npz", mu=np.full(4, np.nan))
    monkeypatch.setattr(promoe.evaluate, "load_inception", lambda path, device: None)  # not reached for the stats
    with pytest.raises(SystemExit, match=r"^error: .*ref.npz: 'mu' holds 4 NaN"):
        promoe.evaluate.main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception", "x"])
    metrics = dict.fromkeys(promoe.evaluate.METRICS, 1.0) | {"sfid": float("nan"), "recall": None}
    monkeypatch.setattr(promoe.evaluate, "evaluate", lambda *args: metrics)
    with pytest.raises(SystemExit, match="^error: sfid not finite"):
        promoe.evaluate.main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception", "x"])
    assert not (tmp_path / "metrics.json").exists()


# -- issue 22: configs are small hand-written files; nonsense refused everywhere; the sampler plans its job ---------

@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: 1.0e-3\ntrain:\n  steps: 3\noptim:\n  weight_decay: 0.1\n", r"line 5 column 1: the key 'optim' is "
                                                                                r"given twice"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", r"line 2 column 8: an alias \(\*name\)"),
])
def test_a_config_file_with_a_key_twice_or_an_alias_is_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{path}, {message}"):
        load_config(path)


def test_a_message_never_quotes_an_unbounded_value(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: [" + ", ".join(["123456789"] * 20000) + "]\n")
    with pytest.raises(ValueError, match=r"optim.lr: expected float, got \[123456789, .*\.\.\.\]") as refused:
        load_config(path)
    assert len(str(refused.value)) < 600


@pytest.mark.parametrize("override, message", [
    ("optim.warmup_steps=-5", r"optim.warmup_steps must be >= 0 \(0: no warm-up\), got -5"),
    ("data.image_size=0", "data.image_size must be >= 1, got 0"),
    ("train.seed=-1", r"train.seed must be in 0 .. 2\*\*32 - 1, got -1"),
    ("model.overrides.superclasses=missing.txt", r"^model: .*missing.txt"),
])
def test_nonsense_run_settings_are_refused_before_the_run(override, message):
    config = tiny_config("model.overrides.router=classifier", "model.overrides.superclasses=[0,1,0,1,0,1,0,1,0,1]",
                         "model.overrides.experts=E3A1S1U0", override)
    with pytest.raises((ValueError, OSError), match=message):
        config.validate(world_size=1, source="configs/demo.yaml")


def test_the_sampler_refuses_a_seed_out_of_range_and_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for option, message in ((["--seed", "-1"], "--seed must lie in 0 .. 2**32 - 1, got -1"),
                            (["--out", str(tmp_path / "file")], f"--out {tmp_path / 'file'} is a file: give a folder")):
        with pytest.raises(SystemExit) as stop:
            parse_args(["--ckpt", "x", *option])
        assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def exported(tmp_path):
    from promoe.weights import save_weights
    from promoe.zoo import build_from_config

    config = tiny_config()
    model = build_from_config(config.model_config())
    save_weights(tmp_path / "ema.safetensors", model.state_dict(), model.config, config)
    return tmp_path / "ema.safetensors"


def test_a_sampling_job_the_disk_cannot_hold_is_refused_before_any_image(exported, tmp_path, monkeypatch):
    import shutil

    import promoe.sample

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 2**20, 2**20))
    with pytest.raises(SystemExit, match=r"^error: --num-images 5000 of 8x8x4 pixels need about .* MiB on the disk "
                                         r"of .*, 1\.0 MiB are free: free space"):
        promoe.sample.main(["--ckpt", str(exported), "--num-images", "5000", "--steps", "1",
                            "--out", str(tmp_path / "samples")])
    assert not (tmp_path / "samples").exists()


def test_a_sampling_job_whose_labels_do_not_fit_in_memory_is_refused_before_drawing_them(exported, tmp_path,
                                                                                         monkeypatch):
    import promoe.sample

    monkeypatch.setattr(promoe.sample, "available_memory", lambda: 2**30)
    monkeypatch.setattr(promoe.sample, "draw_labels", lambda *args: pytest.fail("labels drawn"))
    with pytest.raises(SystemExit, match=r"^error: --num-images 1000000000: their labels alone take 7,629\.4 MiB, "
                                         r"this machine has 1,024\.0 MiB free"):
        promoe.sample.main(["--ckpt", str(exported), "--num-images", "1000000000", "--out", str(tmp_path / "s")])


def test_samples_npz_is_written_without_holding_the_whole_array(tmp_path):
    import tracemalloc

    import torch

    from promoe.sample import collect, png_name
    from promoe.sampling import save_png

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (96, 64, 64, 3), dtype=np.uint8)  # 1.2 MB: the archive, were it held whole
    labels = torch.arange(96) % 10
    for index, image in enumerate(images):
        save_png(image, tmp_path / png_name(index, int(labels[index])))
    tracemalloc.start()
    collect(tmp_path, labels, grid_columns=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < images.nbytes / 4  # a few images at a time (and 0.1 MB of zipfile's own), never the archive
    with np.load(tmp_path / "samples.npz") as archive:
        assert np.array_equal(archive["arr_0"], images) and np.array_equal(archive["arr_1"], labels.numpy())
    assert not (tmp_path / "samples.npz.tmp").exists() and (tmp_path / "grid.png").exists()


def test_a_reference_whose_header_asks_for_more_than_the_file_holds_is_refused(tmp_path):
    import zipfile

    from promoe.eval.reference import read_reference

    reference_stats(tmp_path / "fine.npz")
    with zipfile.ZipFile(tmp_path / "fine.npz") as fine, zipfile.ZipFile(tmp_path / "ref.npz", "w") as crafted:
        for name in fine.namelist():
            content = fine.read(name)
            if name == "sigma.npy":  # the same bytes under a header that asks numpy for 8 TB
                content = content.replace(b"'shape': (4, 4), }" + b" " * 15, b"'shape': (1000000, 1000000), }   ")
            crafted.writestr(name, content)
    with pytest.raises(ValueError, match=r"ref\.npz: 'sigma' declares 8000000000000 bytes .*more than the file holds"):
        read_reference(tmp_path / "ref.npz")
