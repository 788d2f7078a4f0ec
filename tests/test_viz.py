"""Routing maps: per-token experts recorded during sampling, per-class usage, and the CLI's files."""

import json

import numpy as np
import pytest
import torch

from promoe.sampling import load_model, objective_of
from promoe.viz.routing import (
    class_expert_information_bits,
    expert_usage,
    main,
    sample_with_routing,
    usage_entropy_bits,
)


def test_sampling_records_one_expert_per_token_and_never_the_unconditional_one(tiny_run):
    model, config = load_model(tiny_run / "checkpoints" / "step_0000003", weights="model")
    labels = torch.tensor([0, 3, 3])
    images, experts, blocks = sample_with_routing(model, objective_of(config, None), labels, steps=4)
    bank = model.blocks[blocks[0]].mlp.experts.num_experts
    assert images.shape == (3, 1, 28, 28) and blocks == [1]
    assert experts.shape == (4, 1, 3, 49) and experts.min() >= 0
    # Conditional images never reach the unconditional expert (the bank's last); the routed ones all can.
    assert experts.max() < bank - 1


def test_usage_shares_sum_to_one_per_class_and_entropy_matches_the_formula():
    experts = torch.tensor([[[[0, 0, 1, 1], [2, 2, 2, 2]]]])  # [steps 1, layers 1, images 2, tokens 4]
    share = expert_usage(experts, torch.tensor([4, 7]), num_classes=8, num_experts=3)
    assert np.allclose(share[4, 0], [0.5, 0.5, 0.0]) and np.allclose(share[7, 0], [0.0, 0.0, 1.0])
    assert np.isnan(share[0]).all()
    assert usage_entropy_bits(share[4, 0]) == pytest.approx(1.0)
    assert usage_entropy_bits(share[7, 0]) == pytest.approx(0.0)
    p = np.array([0.2, 0.3, 0.5])
    assert usage_entropy_bits(p) == pytest.approx(-(p * np.log2(p)).sum())


def test_class_expert_information_separates_specialisation_from_imbalance():
    rng = np.random.default_rng(0)
    own_expert = np.eye(4)[:, None, :]  # [classes 4, layers 1, experts 4]: each class its own expert
    shared_uneven = np.tile(rng.dirichlet(np.ones(4)), (4, 1, 1))  # every class the same uneven usage
    assert class_expert_information_bits(own_expert) == pytest.approx([2.0])
    assert class_expert_information_bits(shared_uneven) == pytest.approx([0.0], abs=1e-12)
    # Against the joint-distribution formula, classes equally likely; a class without images (NaN) is left out.
    share = rng.dirichlet(np.ones(5), size=(3, 2))  # [classes 3, layers 2, experts 5]
    joint = share / 3
    expected = [(joint[:, layer] * np.log2(joint[:, layer] / (np.full((3, 1), 1 / 3) * joint[:, layer].sum(0)))).sum()
                for layer in range(2)]
    with_missing = np.concatenate([share, np.full((1, 2, 5), np.nan)])
    assert class_expert_information_bits(with_missing) == pytest.approx(expected)


def test_cli_writes_the_map_and_the_usage_table(tiny_run, tmp_path):
    main(["--ckpt", str(tiny_run / "ema.safetensors"), "--class", "3", "--steps", "3", "--images", "2",
          "--per-class", "1", "--out", str(tmp_path)])
    assert (tmp_path / "routing_class3.png").stat().st_size > 0
    usage = json.loads((tmp_path / "routing_usage.json").read_text())
    share = np.array(usage["share"])
    assert share.shape == (10, 1, 7) and np.allclose(share.sum(-1), 1.0)
    assert "| 9 |" in (tmp_path / "routing_usage.md").read_text()
    with pytest.raises(SystemExit, match="outside"):
        main(["--ckpt", str(tiny_run / "ema.safetensors"), "--class", "10", "--out", str(tmp_path)])
