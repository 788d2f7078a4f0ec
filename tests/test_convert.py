"""Official checkpoints: state dicts in the official code's layout, written out by hand from its models
(models/models_{DiT,TCDiT,ECDiT,DiffMoE,ProMoE_TC}.py of ali-vilab/ProMoE), with random weights."""

import pytest
import torch
import torch.nn.functional as F

import promoe
from promoe.convert import load_official_checkpoint, main, promoe_to_official
from promoe.dit.embed import sincos_2d_pos_embed
from promoe.moe.dispatch import make_backend
from promoe.moe.plan import token_choice_plan
from tests.helpers import TINY

D, CLASSES, DEPTH = 32, 10, 2
ROUTED, H = 4, 64  # ProMoE E6A1S1U1: 4 routed + 1 unconditional + 1 shared, width 2D
E, H_BASELINE = 4, 4 * D  # TC-DiT, EC-DiT, DiffMoE E4A1S0U0: 4 experts of full width 4D
# The promoe model and overrides that hold each official model's weights.
MODELS = {
    "promoe": ("ProMoE-S", dict(experts="E6A1S1U1")),
    "tc": ("TC-DiT-S", dict(experts="E4A1S0U0")),
    "ec": ("EC-DiT-S", dict(experts="E4A1S0U0")),
    "diffmoe": ("DiffMoE-S", dict(experts="E4A1S0U0")),
    "dense": ("DiT-S", {}),
}


def linear(g, out_dim, in_dim, prefix):
    return {
        f"{prefix}.weight": torch.randn(out_dim, in_dim, generator=g),
        f"{prefix}.bias": torch.randn(out_dim, generator=g),
    }


def mlp(g, hidden, prefix, names=("fc1", "fc2")):
    return linear(g, hidden, D, f"{prefix}.{names[0]}") | linear(g, D, hidden, f"{prefix}.{names[1]}")


def promoe_layer(g, prefix):
    """SparseMoeBlock of models_ProMoE_TC.py: MoeMLP experts (the unconditional one last), shared expert,
    prototypes."""
    sd = {}
    for e in range(ROUTED + 1):  # the unconditional expert is experts.{ROUTED}
        sd |= mlp(g, H, f"{prefix}.experts.{e}", ("up_proj", "down_proj"))
    sd |= mlp(g, H, f"{prefix}.shared_expert", ("up_proj", "down_proj"))
    sd[f"{prefix}.cluster_centers"] = torch.randn(ROUTED, D, generator=g)
    return sd


def baseline_experts(g, prefix):
    sd = {}
    for e in range(E):
        sd |= mlp(g, H_BASELINE, f"{prefix}.experts.{e}")  # timm-style Mlp: fc1, fc2
    return sd


def tc_layer(g, prefix):
    """models_TCDiT.py: the gate is a MoEGate module holding `weight`."""
    return baseline_experts(g, prefix) | {f"{prefix}.gate.weight": torch.randn(E, D, generator=g)}


def ec_layer(g, prefix):
    """models_ECDiT.py: the gate is a bare parameter `gate_weight`."""
    return baseline_experts(g, prefix) | {f"{prefix}.gate_weight": torch.randn(E, D, generator=g)}


def diffmoe_layer(g, prefix):
    """models_DiffMoE.py: EC-DiT's layout plus the capacity predictor and two buffers."""
    sd = ec_layer(g, prefix)
    sd |= linear(g, D, D, f"{prefix}.capacity_predictor.0") | linear(g, E, D, f"{prefix}.capacity_predictor.2")
    sd[f"{prefix}.expert_threshold"] = torch.rand(E, generator=g)
    sd[f"{prefix}.ema_decay"] = torch.tensor([0.95])
    return sd


MOE_LAYERS = {"promoe": promoe_layer, "tc": tc_layer, "ec": ec_layer, "diffmoe": diffmoe_layer}


def official_state_dict(router="promoe", seed=0):
    """The state dict of an official model (the released ckpt_step_*.pth holds it under ema_model_state_dict)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "pos_embed": sincos_2d_pos_embed(D, 4)[None].float(),
        "x_embedder.proj.weight": torch.randn(D, 4, 2, 2, generator=g),
        "x_embedder.proj.bias": torch.randn(D, generator=g),
        "y_embedder.embedding_table.weight": torch.randn(CLASSES + 1, D, generator=g),
    }
    sd |= linear(g, D, 256, "t_embedder.mlp.0") | linear(g, D, D, "t_embedder.mlp.2")
    for i in range(DEPTH):
        sd |= linear(g, 3 * D, D, f"blocks.{i}.attn.qkv") | linear(g, D, D, f"blocks.{i}.attn.proj")
        if i % 2 == 0 or router == "dense":
            sd |= mlp(g, 4 * D, f"blocks.{i}.mlp")
        else:
            sd |= MOE_LAYERS[router](g, f"blocks.{i}.mlp")
        sd |= linear(g, 6 * D, D, f"blocks.{i}.adaLN_modulation.1")
    sd |= linear(g, 2 * D, D, "final_layer.adaLN_modulation.1") | linear(g, 2 * 2 * 8, D, "final_layer.linear")
    return sd


def load(source, official_model="promoe", **overrides):
    name, model_overrides = MODELS[official_model]
    return load_official_checkpoint(source, name, **{**TINY, **model_overrides, **overrides})


def official_mlp(sd, prefix, x, names=("fc1", "fc2")):
    up, down = (f"{prefix}.{name}" for name in names)
    hidden = F.gelu(F.linear(x, sd[f"{up}.weight"], sd[f"{up}.bias"]), approximate="tanh")
    return F.linear(hidden, sd[f"{down}.weight"], sd[f"{down}.bias"])


@pytest.mark.parametrize("router", MODELS)
def test_official_layout_round_trips_exactly(router):
    """Every key, shape and value, the constants pos_embed and DiffMoE's ema_decay included."""
    official = official_state_dict(router)
    back = promoe_to_official(load(official, router))
    assert sorted(back) == sorted(official)
    for key, value in back.items():
        assert torch.equal(value, official[key]), key


def test_official_checkpoint_loads_with_ema_weights_preferred():
    ema, raw = official_state_dict(seed=0), official_state_dict(seed=1)
    model = load({"step": 500000, "model_state_dict": raw, "ema_model_state_dict": ema, "optimizer_state_dict": {}})
    torch.testing.assert_close(
        model.blocks[1].mlp.experts.w_up_EDH[2], ema["blocks.1.mlp.experts.2.up_proj.weight"].t()
    )
    model = load({"model_state_dict": raw, "ema_model_state_dict": ema}, prefer="model")
    torch.testing.assert_close(model.blocks[1].mlp.router.scorer.prototypes, raw["blocks.1.mlp.cluster_centers"])


def test_unconditional_expert_of_the_official_layout_serves_null_label_tokens(rng):
    """A null-label image through the loaded model equals the official maths with experts.4 (index num_routed)."""
    official = official_state_dict()
    layer = load(official).eval().blocks[1].mlp
    x = torch.randn(1, 16, D, generator=rng)
    out, _ = layer(x, torch.tensor([CLASSES]))
    names = ("up_proj", "down_proj")
    expected = official_mlp(official, "blocks.1.mlp.experts.4", x, names) + official_mlp(
        official, "blocks.1.mlp.shared_expert", x, names)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("router", ["tc", "ec", "diffmoe"])
def test_baseline_experts_and_gate_compute_the_official_maths(router, rng):
    """Expert e of the bank is the official experts.{e} Mlp; the gate scores are softmax(x W_gate^T)."""
    official = official_state_dict(router)
    layer = load(official, router).blocks[1].mlp
    x = torch.randn(16, D, generator=rng)
    for e in range(E):
        expected = official_mlp(official, f"blocks.1.mlp.experts.{e}", x)
        all_to_e = token_choice_plan(torch.full((16, 1), e), torch.ones(16, 1), E)
        torch.testing.assert_close(make_backend("torch").dispatch(x, all_to_e, layer.experts), expected, rtol=1e-4,
                                   atol=1e-4)
    gate = official["blocks.1.mlp.gate.weight" if router == "tc" else "blocks.1.mlp.gate_weight"]
    torch.testing.assert_close(layer.router.scorer(x), F.linear(x, gate).softmax(-1))


def test_diffmoe_capacity_predictor_and_thresholds_are_the_official_ones(rng):
    official = official_state_dict("diffmoe")
    router = load(official, "diffmoe").blocks[1].mlp.router
    x = torch.randn(16, D, generator=rng)
    hidden = F.silu(F.linear(x, official["blocks.1.mlp.capacity_predictor.0.weight"],
                             official["blocks.1.mlp.capacity_predictor.0.bias"]))
    expected = F.linear(hidden, official["blocks.1.mlp.capacity_predictor.2.weight"],
                        official["blocks.1.mlp.capacity_predictor.2.bias"])
    torch.testing.assert_close(router.capacity_predictor(x), expected)
    assert torch.equal(router.expert_threshold_E, official["blocks.1.mlp.expert_threshold"])


def test_module_prefix_of_ddp_checkpoints_is_stripped():
    official = {f"module.{k}": v for k, v in official_state_dict().items()}
    load(official)


def test_missing_key_is_named():
    official = official_state_dict()
    del official["blocks.0.attn.qkv.bias"]
    with pytest.raises(ValueError, match="missing key 'blocks.0.attn.qkv.bias'"):
        load(official)


def test_missing_diffmoe_buffer_is_named_as_the_official_code_names_it():
    official = official_state_dict("diffmoe")
    del official["blocks.1.mlp.expert_threshold"]
    with pytest.raises(ValueError, match="missing key 'blocks.1.mlp.expert_threshold'"):
        load(official, "diffmoe")


def test_unexpected_key_is_named():
    official = official_state_dict() | {"blocks.1.mlp.experts.0.gate_proj.weight": torch.zeros(H, D)}
    with pytest.raises(ValueError, match="unexpected key 'blocks.1.mlp.experts.0.gate_proj.weight'"):
        load(official)


def test_wrong_shape_is_named():
    official = official_state_dict()
    official["blocks.1.mlp.cluster_centers"] = torch.zeros(ROUTED + 1, D)
    with pytest.raises(ValueError, match=r"'blocks.1.mlp.cluster_centers' has shape \[5, 32\]"):
        load(official)


@pytest.mark.parametrize("checkpoint, model, message", [
    ("ec", "tc", "missing key 'blocks.1.mlp.gate.weight'"),  # EC-DiT's gate is gate_weight
    ("tc", "ec", "missing key 'blocks.1.mlp.gate_weight'"),
    ("diffmoe", "ec", "unexpected key 'blocks.1.mlp.capacity_predictor.0.weight'"),
    ("ec", "diffmoe", "missing key 'blocks.1.mlp.expert_threshold'"),
    ("tc", "promoe", "missing key 'blocks.1.mlp.cluster_centers'"),
    ("promoe", "dense", "missing key 'blocks.1.mlp.fc1.weight'"),
])
def test_checkpoint_of_another_official_model_is_refused_naming_the_first_mismatch(checkpoint, model, message):
    with pytest.raises(ValueError, match=message):
        load(official_state_dict(checkpoint), model)


def test_wrong_model_for_the_checkpoint_fails_on_the_first_mismatch():
    with pytest.raises(ValueError, match="does not fit ProMoE-S"):
        load(official_state_dict(), experts="E14A1S1U1")
    with pytest.raises(ValueError, match="unknown model"):
        load_official_checkpoint(official_state_dict(), "ProMoE-XXL")


def test_router_without_an_official_model_is_refused():
    with pytest.raises(ValueError, match="no model with router 'kmeans'"):
        load(official_state_dict(), "promoe", router="kmeans")


def test_wrong_position_embedding_is_reported():
    with pytest.raises(ValueError, match="'pos_embed' has shape"):
        load(official_state_dict(), input_size=16)
    official = official_state_dict()
    official["pos_embed"] = official["pos_embed"].flip(1)
    with pytest.raises(ValueError, match="'pos_embed' does not hold the model's fixed value"):
        load(official)


def test_diffmoe_threshold_decay_other_than_the_models_is_refused():
    official = official_state_dict("diffmoe")
    official["blocks.1.mlp.ema_decay"] = torch.tensor([0.9])
    with pytest.raises(ValueError, match="'blocks.1.mlp.ema_decay' does not hold the model's fixed value"):
        load(official, "diffmoe")


def test_convert_cli_writes_safetensors_of_ema_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    path = tmp_path / "ckpt_step_500000.pth"
    torch.save({"step": 1, "ema_model_state_dict": official_state_dict("diffmoe")}, path)
    monkeypatch.setattr(
        promoe.convert,
        "build_model",
        lambda name, **kw: promoe.build_model(name, **{**TINY, **MODELS["diffmoe"][1], **kw}),
    )
    main([str(path), "--model", "DiffMoE-S", "--out", str(tmp_path / "out" / "model.safetensors")])
    weights = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(
        weights["blocks.1.mlp.router.scorer.gate.weight"], official_state_dict("diffmoe")["blocks.1.mlp.gate_weight"]
    )
