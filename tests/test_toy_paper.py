"""The toy-scale paper experiments' pipeline, 2 steps per model on a few images: it trains, evaluates at each
milestone and writes the report with its plots (4 tiny runs, about a minute on 2 cores: kept in the default run)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    from promoe.eval.feature_net import FeatureNet, save_feature_net

    net = tmp_path_factory.mktemp("net") / "net.safetensors"
    save_feature_net(FeatureNet(), net)  # untrained: the pipeline, not the numbers, is under test
    return net


def tiny_argv(tmp_path, feature_net, *extra):
    return ["--out", str(tmp_path / "runs"), "--report", str(tmp_path / "docs" / "toy.md"), "--fid-samples", "20",
            "--sample-steps", "2", "--val-images", "20", "--feature-net", str(feature_net), *extra]


def test_router_swap_writes_every_pair_per_seed_and_resumes_without_work(tmp_path, feature_net):
    import toy_paper

    argv = tiny_argv(tmp_path, feature_net, "--experiment", "routers", "--steps", "2", "--seeds", "1",
                     "--models", "linear softmax", "prototypes + RCL + conditional")
    toy_paper.main(argv)
    text = (tmp_path / "docs" / "toy.md").read_text()
    assert "| linear softmax | 1 |" in text and "| prototypes + RCL + conditional | 1 |" in text
    for key in ("val_mse", "fid_best", "accuracy_best"):
        assert f"prototypes + RCL + conditional better than linear softmax on {key}" in text
    assert "(1 of 1 seeds" in text or "(0 of 1 seeds" in text
    assert "I(class; expert)" in text
    for name in ("toy_loss.png", "toy_guidance.png"):
        assert (tmp_path / "docs" / name).stat().st_size > 0
    cache = tmp_path / "runs" / "linear_softmax_seed1" / "eval_step0000002.json"
    first = cache.stat().st_mtime_ns
    toy_paper.main(argv)  # resumes: nothing retrains or re-evaluates
    assert cache.stat().st_mtime_ns == first


def test_long_run_is_evaluated_at_each_milestone_and_resumed_between_them(tmp_path, feature_net):
    import toy_paper

    toy_paper.main(tiny_argv(tmp_path, feature_net, "--experiment", "long", "--steps", "1", "3", "--models",
                             "ProMoE"))
    run = tmp_path / "runs" / "promoe_seed0"
    assert (run / "eval_step0000001.json").exists() and (run / "eval_step0000003.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    text = (tmp_path / "docs" / "toy.md").read_text()
    assert "## After 1 steps" in text and "## After 3 steps" in text
    assert (tmp_path / "docs" / "toy_routing.png").stat().st_size > 0


def test_unknown_model_names_the_experiments_models(tmp_path, feature_net):
    import toy_paper

    with pytest.raises(SystemExit):
        toy_paper.main(tiny_argv(tmp_path, feature_net, "--experiment", "routers", "--models", "ProMoE"))


def test_an_ordering_on_one_seed_is_not_called_a_hold_in_every_seed():
    import toy_paper

    one = {"A": [{"seed": 0, "val_mse": 0.20}], "B": [{"seed": 0, "val_mse": 0.21}]}
    line = toy_paper.ordering(one, "A", "B", "val_mse", True, 4)
    assert "in its one seed (no evidence either way)" in line and "every seed" not in line
    two = {"A": [{"seed": 0, "val_mse": 0.20}, {"seed": 1, "val_mse": 0.22}],
           "B": [{"seed": 0, "val_mse": 0.21}, {"seed": 1, "val_mse": 0.21}]}
    assert "**mixed** (1 of 2 seeds" in toy_paper.ordering(two, "A", "B", "val_mse", True, 4)
    two["A"][1]["val_mse"] = 0.19
    assert "**holds** in every seed (2 of 2 seeds" in toy_paper.ordering(two, "A", "B", "val_mse", True, 4)
