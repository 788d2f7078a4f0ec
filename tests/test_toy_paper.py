"""The toy-scale paper experiment's pipeline, 2 steps per model on a few images: it trains, evaluates and writes
the report with its plots (about 35 s on 2 cores: kept in the default run)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_toy_paper_pipeline_writes_the_tables_and_plots(tmp_path):
    import toy_paper

    from promoe.eval.feature_net import FeatureNet, save_feature_net

    net = tmp_path / "net.safetensors"
    save_feature_net(FeatureNet(), net)  # untrained: the pipeline, not the numbers, is under test
    report = tmp_path / "docs" / "toy.md"
    argv = ["--out", str(tmp_path / "runs"), "--report", str(report), "--steps", "2", "--seeds", "0",
            "--fid-samples", "20", "--sample-steps", "2", "--val-images", "20", "--feature-net", str(net),
            "--models", "Dense-DiT", "+ prototypical routing", "ProMoE"]
    toy_paper.main(argv)
    text = report.read_text()
    for row in ("| Dense-DiT |", "| ProMoE |", "| + prototypical routing |", "Do the paper's orderings hold"):
        assert row in text
    for name in ("toy_loss.png", "toy_fid.png", "toy_routing.png"):
        assert (report.parent / name).stat().st_size > 0
    first = (tmp_path / "runs" / "promoe_seed0" / "eval.json").stat().st_mtime_ns
    toy_paper.main(argv)  # resumes: nothing retrains or re-evaluates
    assert (tmp_path / "runs" / "promoe_seed0" / "eval.json").stat().st_mtime_ns == first
