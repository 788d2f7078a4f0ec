"""Routing maps: per-token experts recorded during sampling, per-class usage, and the CLI's files."""

import json

import numpy as np
import pytest
import torch

from promoe.sampling import load_model, objective_of
from promoe.viz.routing import (
    class_expert_information_bits,
    class_expert_information_max_bits,
    expert_usage,
    main,
    sample_with_routing,
    shuffled_label_information_bits,
    usage_entropy_bits,
)


def test_sampling_records_one_expert_per_token_and_never_the_unconditional_one(tiny_run):
    model, config = load_model(tiny_run / "checkpoints" / "step_0000003", weights="model")
    labels = torch.tensor([0, 3, 3])
    sampled = sample_with_routing(model, objective_of(config, None), labels, steps=4)
    bank = model.blocks[sampled.blocks[0]].mlp.experts.num_experts
    assert sampled.images.shape == (3, 1, 28, 28) and sampled.blocks == [1]
    assert sampled.experts.shape == (4, 1, 3, 49) and sampled.experts.min() >= 0
    # Conditional images never reach the unconditional expert (the bank's last); the routed ones all can.
    assert sampled.experts.max() < bank - 1
    # Each step's input is kept: pure noise (std 1) at the first step, the timesteps falling from the first.
    assert sampled.inputs.shape == (4, 3, 1, 28, 28) and 0.8 < sampled.inputs[0].std() < 1.2
    assert sampled.timesteps[0] == 1000 and (sampled.timesteps.diff() < 0).all()


def test_label_swap_reroutes_the_same_hidden_states_and_is_the_identity_for_the_same_labels(tiny_run):
    model, config = load_model(tiny_run / "checkpoints" / "step_0000003", weights="model")
    labels = torch.tensor([0, 3, 3, 7])
    torch.manual_seed(0)  # the tiny run is 3 steps old: give the label's embedding a say in the modulation
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.5)
    model.y_embedder.embedding_table.weight.data.normal_()
    same = sample_with_routing(model, objective_of(config, None), labels, steps=3, swapped_labels=labels)
    assert torch.equal(same.swapped_experts, same.experts)
    other = sample_with_routing(model, objective_of(config, None), labels, steps=3, swapped_labels=(labels + 1) % 10)
    assert torch.equal(other.experts, same.experts)  # the sampling itself is not touched
    assert other.swapped_experts.shape == other.experts.shape
    assert not torch.equal(other.swapped_experts, other.experts)


def test_information_maximum_splits_the_classes_evenly_over_the_experts():
    assert class_expert_information_max_bits(10, 7) == pytest.approx(2.722, abs=1e-3)  # not log2 7 = 2.807
    assert class_expert_information_max_bits(10, 6) == pytest.approx(2.522, abs=1e-3)
    assert class_expert_information_max_bits(10, 4) == pytest.approx(1.971, abs=1e-3)
    assert class_expert_information_max_bits(10, 12) == pytest.approx(np.log2(10))  # one expert per class
    assert class_expert_information_max_bits(10, 1) == 0.0
    # The even deterministic split attains it: the information of that routing is the maximum.
    split = np.eye(7)[[0, 0, 1, 1, 2, 2, 3, 4, 5, 6]][:, None, :]
    assert class_expert_information_bits(split) == pytest.approx([class_expert_information_max_bits(10, 7)])
    # And random routings never exceed it.
    rng = np.random.default_rng(0)
    for _ in range(200):
        share = rng.dirichlet(np.full(7, 0.1), size=(10, 1))
        assert class_expert_information_bits(share)[0] <= class_expert_information_max_bits(10, 7) + 1e-12


def test_shuffled_labels_carry_no_information_where_the_real_ones_carry_all():
    labels = torch.arange(4).repeat_interleave(5)  # 4 classes x 5 images
    experts = labels[None, None, :, None].expand(2, 1, 20, 6)  # each class its own expert, every token
    assert class_expert_information_bits(expert_usage(experts, labels, 4, 4)) == pytest.approx([2.0])
    null = shuffled_label_information_bits(experts, labels, 4, 4, permutations=50)
    assert null.shape == (50, 1) and null.mean() < 1.0  # a permutation keeps some images in their class


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
