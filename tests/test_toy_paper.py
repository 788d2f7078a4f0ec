"""The toy-scale paper experiments' pipeline, 2 steps per model on a few images: it trains, evaluates at each
milestone and writes the report with its plots (7 tiny runs, about two minutes on 2 cores: kept in the default run);
and the paired intervals that every report's verdicts come from."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

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


@pytest.mark.slow  # 53 s; the pipeline's pairing, caching and resume run by default in the RCL ablation's test
def test_router_swap_writes_every_pair_per_seed_and_resumes_without_work(tmp_path, feature_net):
    import toy_paper

    argv = tiny_argv(tmp_path, feature_net, "--experiment", "routers", "--steps", "2", "--seeds", "1",
                     "--models", "linear softmax", "prototypes + RCL + conditional")
    toy_paper.main(argv)
    text = (tmp_path / "docs" / "toy.md").read_text()
    assert "| linear softmax | 1 |" in text and "| prototypes + RCL + conditional | 1 |" in text
    for endpoint in ("validation MSE", "FID at each run's best guidance", "conditional accuracy at each run's best"):
        assert f"| prototypes + RCL + conditional − linear softmax | {endpoint}" in text
    assert "no evidence either way (no interval from one pair)" in text  # one seed: no verdict
    assert "I(class; expert)" in text and "(max 2.72)" in text  # 7 choosable experts in both
    for name in ("toy_loss.png", "toy_guidance.png"):
        assert (tmp_path / "docs" / name).stat().st_size > 0
    cache = tmp_path / "runs" / "linear_softmax_seed1" / "eval_step0000002.json"
    first = cache.stat().st_mtime_ns
    toy_paper.main(argv)  # resumes: nothing retrains or re-evaluates
    assert cache.stat().st_mtime_ns == first


@pytest.mark.slow  # 53 s
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


@pytest.mark.slow  # 73 s; the pipeline it shares with the RCL ablation runs by default in that test
def test_decisive_experiment_states_its_endpoints_first_and_measures_noise_null_and_label_swap(tmp_path,
                                                                                                 feature_net):
    import toy_paper

    toy_paper.main(tiny_argv(tmp_path, feature_net, "--experiment", "decisive", "--steps", "2", "--seeds", "0", "1"))
    text = (tmp_path / "docs" / "toy.md").read_text()
    preamble = text[: text.index("## After 2 steps")]
    assert ("**Primary endpoints** (FID from 20 samples): validation MSE; FID at guidance 2, each as the paired"
            in preamble)
    assert "ProMoE − TC-DiT" in preamble and "fixed in issue 23 before the runs" in preamble
    assert "| ProMoE − TC-DiT | validation MSE (lower is better) |" in text
    assert "| ProMoE − TC-DiT | FID at guidance 2 (lower is better) |" in text
    assert "| ProMoE − TC-DiT | conditional accuracy at guidance 2 (higher is better) |" in text  # secondary
    assert text.count("95% CI") >= 2 and "not measured" not in text
    assert "| TC-DiT | 0 | 2 |" in text and "| ProMoE | 0 | 2 |" in text  # the second noise seed, seed 0 only
    assert "| ProMoE − TC-DiT | 0 | 2 |" in text and "| TC-DiT | 1 | 2 |" not in text
    assert "| ProMoE | 3 |" in text and "(max 2.52)" in text and "(max 1.97)" in text  # MoE layer 3 of 3
    assert (tmp_path / "docs" / "toy_routing.png").stat().st_size > 0
    result = toy_paper.json.loads((tmp_path / "runs" / "promoe_seed0" / "eval_step0000002.json").read_text())
    assert len(result["mi_swap_label_bits"]) == len(result["mi_null_bits"]) == 3
    assert np.allclose(np.sum(result["load_share"], axis=1), 1.0)


def test_unknown_endpoint_names_the_known_ones(tmp_path, feature_net):
    import toy_paper

    with pytest.raises(SystemExit):
        toy_paper.main(tiny_argv(tmp_path, feature_net, "--experiment", "decisive", "--endpoints", "fid@3"))
    args = toy_paper.parse_args(["--experiment", "decisive", "--endpoints", "fid@2.0", "val_mse"])
    assert args.endpoints == ["fid@2", "val_mse"] and args.fid_samples == 2000 and args.guidance == [2.0]


def test_paired_interval_is_the_t_interval_and_its_verdict_reads_the_interval_alone():
    import toy_paper

    differences = [0.5, -1.0, 2.0, 1.5, 0.0, 1.0]
    mean, low, high = toy_paper.paired_interval(differences)
    half = stats.t.ppf(0.975, 5) * np.std(differences, ddof=1) / np.sqrt(6)
    assert mean == pytest.approx(0.6667, abs=1e-4) and (low, high) == pytest.approx((mean - half, mean + half))
    assert toy_paper.verdict("A", "B", low, high, lower_better=True) == "no evidence either way"  # contains 0
    assert toy_paper.verdict("A", "B", 0.1, 0.3, lower_better=True) == "**B better**"
    assert toy_paper.verdict("A", "B", -0.3, -0.1, lower_better=True) == "**A better**"
    assert toy_paper.verdict("A", "B", 0.1, 0.3, lower_better=False) == "**A better**"
    assert np.isnan(toy_paper.paired_interval([0.2])[1])
    # Three seeds that agree in sign are not enough when their spread is large: unanimity is no verdict.
    runs = {"A": [{"seed": s, "val_mse": v} for s, v in enumerate((0.20, 0.10, 0.209))],
            "B": [{"seed": s, "val_mse": 0.21} for s in range(3)]}
    assert toy_paper.ordering(runs, "A", "B", "val_mse", 0.95).endswith("| no evidence either way |")
    one = {name: results[:1] for name, results in runs.items()}
    assert "no evidence either way (no interval from one pair)" in toy_paper.ordering(one, "A", "B", "val_mse", 0.95)


def test_swapped_labels_are_another_class_and_as_balanced_as_the_real_ones():
    import toy_paper

    labels = toy_paper.torch.arange(10).repeat_interleave(20)
    swapped = toy_paper.swapped_labels(labels, 10)
    assert (swapped != labels).all()
    assert (swapped.bincount(minlength=10) == 20).all()  # every class as often a swapped label as a real one
    for label in range(10):  # each class's images spread over the other nine
        assert len(swapped[labels == label].unique()) == 9


def test_rcl_ablation_pairs_the_arms_on_mse_and_class_information_at_97_5_percent(tmp_path, feature_net):
    import toy_paper

    toy_paper.main(tiny_argv(tmp_path, feature_net, "--experiment", "rcl", "--steps", "2", "--seeds", "6", "7"))
    text = (tmp_path / "docs" / "toy.md").read_text()
    assert "| RCL on − RCL off | validation MSE (lower is better) |" in text
    assert ("| RCL on − RCL off | I(class; top expert) above its shuffled-label null, mean over MoE layers, bits "
            "(higher is better) |") in text
    assert "| RCL on − RCL off | FID at guidance 2 (lower is better) |" in text  # secondary
    assert text.count("97.5% CI") >= 2 and "not measured" not in text
    on = toy_paper.json.loads((tmp_path / "runs" / "rcl_on_seed7" / "eval_step0000002.json").read_text())
    assert on["settings"]["routing_noise_seed"] == 0  # the same noise for every seed, as pre-registered
    assert toy_paper.mi_excess_bits(on) == np.mean(np.subtract(on["mi_bits"], on["mi_null_bits"]))
    assert (tmp_path / "runs" / "rcl_off_seed6" / "eval_step0000002.json").exists()
    assert "| pixel intensity (class-blind) |" in text and "| k-means on patches (class-blind) |" in text
    assert "Experts under 2% of the tokens they could take" in text


def test_class_blind_routers_split_patches_by_pixels_alone():
    import toy_paper

    rng = np.random.default_rng(0)
    dark, bright = rng.uniform(0, 0.2, (50, 16)), rng.uniform(0.8, 1.0, (50, 16))
    patches = np.concatenate([dark, bright])
    for routing in (toy_paper.intensity_routing(patches, 2), toy_paper.kmeans_routing(patches, patches, 2)):
        assert len(set(routing[:50])) == 1 and len(set(routing[50:])) == 1 and routing[0] != routing[50]
    assert np.bincount(toy_paper.intensity_routing(rng.uniform(size=(60, 16)), 6)).tolist() == [10] * 6
    image = np.arange(28 * 28, dtype=np.uint8).reshape(1, 28, 28)
    assert (toy_paper.patches_of(image)[0, 1] * 255).round().astype(int)[:4].tolist() == [4, 5, 6, 7]
