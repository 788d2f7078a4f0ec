import pytest
import torch

import promoe

# (activated, total) of the official implementation, which the paper's Table 2 rounds to 33M / 75M, ...
OFFICIAL_COUNTS = {
    "ProMoE-S": (32_99e4, 75_54e4),
    "ProMoE-B": (130_57e4, 300_61e4),
    "ProMoE-L": (458_26e4, 1062_68e4),
    "ProMoE-XL": (675_34e4, 1567_73e4),
}
# Table 5: TC-DiT (DiT-MoE) and EC-DiT at L with 8 full-width experts: 458M activated, 1.163B total.
TABLE5 = {"TC-DiT-L-E8": (458e6, 1163e6), "EC-DiT-L-E8": (458e6, 1163e6)}


@pytest.mark.parametrize("name, counts", [*OFFICIAL_COUNTS.items(), *TABLE5.items()])
def test_parameter_counts_match_the_paper(name, counts):
    activated, total = promoe.count_params(promoe.build_model(name, device="meta"))
    # The official figures are given to 0.01M; the paper's to 1%.
    tolerance = 0.006e6 if name in OFFICIAL_COUNTS else 0.01 * counts[1]
    assert abs(activated - counts[0]) < tolerance
    assert abs(total - counts[1]) < tolerance


def test_promoe_xl_reports_675m_activated_and_1_568b_total():
    activated, total = promoe.count_params(promoe.build_model("ProMoE-XL", device="meta"))
    assert (round(activated / 1e6), round(total / 1e9, 3)) == (675, 1.568)


def test_dense_dit_activates_everything():
    activated, total = promoe.count_params(promoe.build_model("DiT-XL", device="meta"))
    assert activated == total and abs(total - 675e6) < 1e6


def test_top3_override_changes_activated_but_not_total_parameters():
    top1 = promoe.count_params(promoe.build_model("ProMoE-S", device="meta"))
    top3 = promoe.count_params(promoe.build_model("ProMoE-S", device="meta", experts="E14A3S1U1"))
    assert top3[1] == top1[1]
    per_expert = 2 * 384 * 768 + 768 + 384
    assert top3[0] - top1[0] == 6 * 2 * per_expert  # 6 MoE blocks, 2 more experts each


def test_every_paper_model_builds_on_meta():
    for name in promoe.PAPER_MODELS:
        model = promoe.build_model(name, device="meta")
        assert next(model.parameters()).device.type == "meta"


def test_moe_layers_sit_in_odd_blocks_when_interleaved():
    model = promoe.build_model("ProMoE-S", device="meta")
    assert [block.is_moe for block in model.blocks] == [i % 2 == 1 for i in range(12)]
    model = promoe.build_model("ProMoE-S", device="meta", interleave=False)
    assert all(block.is_moe for block in model.blocks)


def test_overrides_reach_the_model():
    model = promoe.build_model("ProMoE-S", input_size=16, experts="E14A3S1U1", device="meta")
    assert model.config.input_size == 16 and model.pos_embed.shape == (1, 64, 384)
    assert model.blocks[1].mlp.router.top_k == 3


@pytest.mark.parametrize("name", ["ProMoE-XXL", "promoe-S", "DiT-S-E8", "ProMoE-S-E8"])
def test_unknown_model_names_raise(name):
    with pytest.raises(ValueError, match="model"):
        promoe.build_model(name, device="meta")


def test_dtype_argument_casts_the_model():
    model = promoe.build_model("ProMoE-S", device="meta", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_diffmoe_capacity_predictor_loss_weight_scales_only_the_predictor_loss(rng):
    """The weight defaults to DiffMoE's 1.0 and multiplies the BCE of the capacity predictor, nothing else."""
    tiny = dict(input_size=8, hidden_size=32, num_heads=4, depth=2, num_classes=10, experts="E4A1S0U0")
    default = promoe.build_model("DiffMoE-S", **tiny).blocks[1].mlp.train()
    paper = promoe.build_model("DiffMoE-S", capacity_predictor_loss_weight=0.01, **tiny).blocks[1].mlp.train()
    paper.load_state_dict(default.state_dict())
    x, labels = torch.randn(2, 16, 32, generator=rng), torch.tensor([1, 2])
    y_default, aux_default = default(x, labels)
    y_paper, aux_paper = paper(x, labels)
    assert default.router.predictor_loss_weight == 1.0
    torch.testing.assert_close(y_paper, y_default)
    torch.testing.assert_close(aux_paper["capacity_predictor"], 0.01 * aux_default["capacity_predictor"])


def test_negative_capacity_predictor_loss_weight_is_refused():
    with pytest.raises(ValueError, match="capacity_predictor_loss_weight"):
        promoe.model_config("DiffMoE-S", capacity_predictor_loss_weight=-1.0)
