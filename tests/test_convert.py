"""Official ProMoE checkpoints: a state dict in the official layout, built here from random weights."""

import pytest
import torch

import promoe
from promoe.convert import load_official_checkpoint, main, promoe_to_official
from promoe.dit.embed import sincos_2d_pos_embed
from tests.helpers import TINY

D, H, ROUTED, CLASSES, DEPTH = 32, 64, 4, 10, 2  # E6A1S1U1: 4 routed + 1 unconditional + 1 shared


def linear(g, out_dim, in_dim, prefix):
    return {
        f"{prefix}.weight": torch.randn(out_dim, in_dim, generator=g),
        f"{prefix}.bias": torch.randn(out_dim, generator=g),
    }


def official_state_dict(seed=0):
    """The key layout of the released ckpt_step_*.pth, written out from the issue's description."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "x_embedder.proj.weight": torch.randn(D, 4, 2, 2, generator=g),
        "x_embedder.proj.bias": torch.randn(D, generator=g),
        "pos_embed": sincos_2d_pos_embed(D, 4)[None].float(),
        "y_embedder.embedding_table.weight": torch.randn(CLASSES + 1, D, generator=g),
    }
    sd |= linear(g, D, 256, "t_embedder.mlp.0") | linear(g, D, D, "t_embedder.mlp.2")
    for i in range(DEPTH):
        sd |= linear(g, 3 * D, D, f"blocks.{i}.attn.qkv") | linear(g, D, D, f"blocks.{i}.attn.proj")
        sd |= linear(g, 6 * D, D, f"blocks.{i}.adaLN_modulation.1")
        if i % 2 == 0:
            sd |= linear(g, 4 * D, D, f"blocks.{i}.mlp.fc1") | linear(g, D, 4 * D, f"blocks.{i}.mlp.fc2")
            continue
        for e in range(ROUTED + 1):  # the unconditional expert is experts.{ROUTED}
            sd |= linear(g, H, D, f"blocks.{i}.mlp.experts.{e}.up_proj")
            sd |= linear(g, D, H, f"blocks.{i}.mlp.experts.{e}.down_proj")
        sd |= linear(g, H, D, f"blocks.{i}.mlp.shared_expert.up_proj") | linear(
            g, D, H, f"blocks.{i}.mlp.shared_expert.down_proj"
        )
        sd[f"blocks.{i}.mlp.cluster_centers"] = torch.randn(ROUTED, D, generator=g)
    sd |= linear(g, 2 * D, D, "final_layer.adaLN_modulation.1") | linear(g, 2 * 2 * 8, D, "final_layer.linear")
    return sd


def load(source, **overrides):
    return load_official_checkpoint(source, "ProMoE-S", **{**TINY, "experts": "E6A1S1U1", **overrides})


def test_official_checkpoint_loads_with_ema_weights_preferred():
    ema, raw = official_state_dict(0), official_state_dict(1)
    model = load({"step": 500000, "model_state_dict": raw, "ema_model_state_dict": ema, "optimizer_state_dict": {}})
    torch.testing.assert_close(
        model.blocks[1].mlp.experts.w_up_EDH[2], ema["blocks.1.mlp.experts.2.up_proj.weight"].t()
    )
    model = load({"model_state_dict": raw, "ema_model_state_dict": ema}, prefer="model")
    torch.testing.assert_close(model.blocks[1].mlp.router.scorer.prototypes, raw["blocks.1.mlp.cluster_centers"])


def test_official_layout_round_trips_exactly():
    official = official_state_dict()
    model = load(official)
    back = promoe_to_official(model.state_dict())
    assert sorted(back) == sorted(k for k in official if k != "pos_embed")
    for key, value in back.items():
        assert torch.equal(value, official[key]), key


def test_unconditional_expert_of_the_official_layout_serves_null_label_tokens(rng):
    """A null-label image through the loaded model equals the official maths with experts.4 (index num_routed)."""
    official = official_state_dict()
    model = load(official).eval()
    layer = model.blocks[1].mlp
    x = torch.randn(1, 16, D, generator=rng)
    out, _ = layer(x, torch.tensor([CLASSES]))

    def official_mlp(prefix, v):
        w1, b1 = official[f"{prefix}.up_proj.weight"], official[f"{prefix}.up_proj.bias"]
        w2, b2 = official[f"{prefix}.down_proj.weight"], official[f"{prefix}.down_proj.bias"]
        return torch.nn.functional.gelu(v @ w1.t() + b1, approximate="tanh") @ w2.t() + b2

    expected = official_mlp("blocks.1.mlp.experts.4", x) + official_mlp("blocks.1.mlp.shared_expert", x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_module_prefix_of_ddp_checkpoints_is_stripped():
    official = {f"module.{k}": v for k, v in official_state_dict().items()}
    load(official)


def test_missing_key_is_named():
    official = official_state_dict()
    del official["blocks.0.attn.qkv.bias"]
    with pytest.raises(KeyError, match="missing key 'blocks.0.attn.qkv.bias'"):
        load(official)


def test_unexpected_key_is_named():
    official = official_state_dict() | {"blocks.1.mlp.experts.0.gate_proj.weight": torch.zeros(H, D)}
    with pytest.raises(KeyError, match="unexpected key 'blocks.1.mlp.experts.0.gate_proj.weight'"):
        load(official)


def test_wrong_shape_is_named():
    official = official_state_dict()
    official["blocks.1.mlp.cluster_centers"] = torch.zeros(ROUTED + 1, D)
    with pytest.raises(ValueError, match=r"'blocks.1.mlp.router.scorer.prototypes' has shape \[5, 32\]"):
        load(official)


def test_wrong_model_for_the_checkpoint_fails_on_the_first_mismatch():
    with pytest.raises((KeyError, ValueError), match="does not fit ProMoE-S"):
        load(official_state_dict(), experts="E14A1S1U1")
    with pytest.raises(ValueError, match="unknown model"):
        load_official_checkpoint(official_state_dict(), "ProMoE-XXL")


def test_wrong_position_embedding_is_reported():
    with pytest.raises(ValueError, match="pos_embed"):
        load(official_state_dict(), input_size=16)


def test_convert_cli_writes_safetensors_of_ema_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    path = tmp_path / "ckpt_step_500000.pth"
    torch.save({"step": 1, "ema_model_state_dict": official_state_dict()}, path)
    monkeypatch.setattr(
        promoe.convert,
        "build_model",
        lambda name, **kw: promoe.build_model(name, **{**TINY, "experts": "E6A1S1U1", **kw}),
    )
    main([str(path), "--model", "ProMoE-S", "--out", str(tmp_path / "out" / "model.safetensors")])
    weights = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(
        weights["blocks.1.mlp.shared.fc1.weight"], official_state_dict()["blocks.1.mlp.shared_expert.up_proj.weight"]
    )
