import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import promoe
from promoe.dit import attention
from promoe.dit.embed import TimestepEmbedder, sincos_2d_pos_embed
from tests.helpers import TINY, dit_reduction_lengths, reordered_steps_tolerance, reordered_sums_tolerance, tiny_model


def mae_pos_embed(dim, grid_size):
    """MAE's numpy get_2d_sincos_pos_embed, which DiT and the official ProMoE code use, restated."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_position_embedding_matches_mae_layout():
    np.testing.assert_allclose(sincos_2d_pos_embed(64, 5).numpy(), mae_pos_embed(64, 5), atol=1e-12)


def test_timestep_sinusoid_is_cos_then_sin():
    t = torch.tensor([0.0, 3.5, 999.0])
    emb = TimestepEmbedder.sinusoid(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))


@pytest.mark.parametrize("learn_sigma, channels", [(True, 8), (False, 4)])
def test_forward_shapes_and_learn_sigma_channels(learn_sigma, channels, rng):
    model = tiny_model("ProMoE-S", learn_sigma=learn_sigma)
    out = model(torch.randn(3, 4, 8, 8, generator=rng), torch.rand(3, generator=rng) * 1000, torch.tensor([0, 4, 10]))
    assert out.shape == (3, channels, 8, 8)


def test_demo_geometry_28x28_single_channel_patch_4(rng):
    model = tiny_model("ProMoE-S", input_size=28, patch_size=4, in_channels=1, learn_sigma=False)
    out, aux = model(torch.randn(2, 1, 28, 28, generator=rng), torch.rand(2) * 1000, torch.tensor([1, 2]),
                     return_aux=True)
    assert out.shape == (2, 1, 28, 28) and "rcl" in aux


def test_wrong_input_shapes_raise_clear_errors(rng):
    model = tiny_model("ProMoE-S")
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 4, 8, 8\]"):
        model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expected x"):
        model(torch.randn(2, 4, 8, 8), torch.rand(3), torch.tensor([1, 2]))


@pytest.mark.order_sensitive
def test_sdpa_attention_matches_the_textbook_formula(rng):
    layer = attention.Attention(32, 4, qk_norm=True)
    x = torch.randn(2, 7, 32, generator=rng)
    q, k, v = layer.qkv(x).view(2, 7, 3, 4, 8).unbind(2)
    q, k = layer.q_norm(q), layer.k_norm(k)
    weights = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(8)).softmax(-1)
    expected = layer.proj((weights @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 7, 32))
    # SDPA's fused sums against the formula's: the scores' (head dim), the softmax's and the weighted values' (7
    # tokens), the projection's (32), in another order.
    torch.testing.assert_close(layer(x), expected, **reordered_sums_tolerance(
        8, 7, 7, 32, magnitude=expected.abs().max().item()))


def test_flash_path_is_used_only_on_cuda_half_precision(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_func", lambda q, k, v: None)
    assert not attention.can_use_flash(torch.zeros(1, dtype=torch.bfloat16))  # CPU tensor
    assert not attention.can_use_flash(torch.zeros(1))


@pytest.mark.order_sensitive
def test_flash_and_sdpa_paths_give_the_same_result(monkeypatch, rng):
    """Stand in flash_attn_func's contract ([B, L, H, hd] in and out) with SDPA and force the flash path."""
    def fake_flash(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    layer = attention.Attention(32, 4)
    x = torch.randn(2, 5, 32, generator=rng)
    expected = layer(x)
    monkeypatch.setattr(attention, "flash_attn_func", fake_flash)
    monkeypatch.setattr(attention, "can_use_flash", lambda x: True)
    # The same SDPA on transposed views, whose strides may choose another order of the same sums.
    torch.testing.assert_close(layer(x), expected, **reordered_sums_tolerance(
        8, 5, 5, 32, magnitude=expected.abs().max().item()))


def test_initialisation_follows_dit(rng):
    model = promoe.build_model("ProMoE-S", input_size=8, hidden_size=32, num_heads=4, depth=2, num_classes=10)
    assert all((block.adaLN_modulation[-1].weight == 0).all() for block in model.blocks)
    assert (model.final_layer.linear.weight == 0).all()
    protos = model.blocks[1].mlp.router.scorer.prototypes
    assert 0.01 < protos.std().item() < 0.03  # N(0, 0.02)
    bank = model.blocks[1].mlp.experts
    assert (bank.b_up_EH == 0).all() and bank.w_up_EDH.abs().max() <= math.sqrt(6 / (32 + 64))
    # Baseline gates as their official code: N(0, 0.006) for EC-DiT and DiffMoE, nn.Linear's own for DiT-MoE.
    for name, low, high in [("EC-DiT-S", 0.004, 0.008), ("DiffMoE-S-E4", 0.004, 0.008), ("TC-DiT-S", 0.05, 0.2)]:
        gate = promoe.build_model(name, input_size=8, hidden_size=32, num_heads=4, depth=2).blocks[1].mlp.router
        assert low < gate.scorer.gate.weight.std().item() < high, name
    # Zero-initialised output: the untrained model predicts 0 everywhere.
    out = model(torch.randn(2, 4, 8, 8, generator=rng), torch.rand(2), torch.tensor([1, 10]))
    assert (out == 0).all()


@pytest.mark.order_sensitive
def test_backends_give_the_same_model_outputs_and_gradients(rng):
    model = tiny_model("ProMoE-S", experts="E6A2S1U1")
    x, t, y = torch.randn(4, 4, 8, 8, generator=rng), torch.rand(4, generator=rng) * 1000, torch.tensor([1, 10, 3, 4])
    results = {}
    for backend in ("loop", "torch"):
        model.zero_grad()
        torch.manual_seed(0)  # same label dropout
        with promoe.dispatch_backend(model, backend):
            out, aux = model(x, t, y, return_aux=True)
        (out.square().mean() + sum(aux.values())).backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in model.parameters()]
    # fp32 sums in a different order through 2 blocks, forward and backward, and the loss's mean of the output.
    sums = (*dit_reduction_lengths(model.config, images=4), out.numel())
    for a, b in zip(results["loop"], results["torch"]):
        torch.testing.assert_close(a, b, **reordered_sums_tolerance(*sums, magnitude=b.abs().max().item()))


@pytest.mark.order_sensitive
def test_training_with_triton_kernels_matches_loop_step_by_step():
    from promoe.diffusion import RectifiedFlow

    losses = {}
    for backend in ("loop", "triton"):
        torch.manual_seed(3)  # the same DiT initialisation in both runs
        model = promoe.build_model("ProMoE-S", **TINY, experts="E6A2S1U1")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator, x0 = torch.Generator().manual_seed(0), torch.randn(6, 4, 8, 8, generator=torch.Generator())
        labels = torch.tensor([0, 1, 2, 3, 10, 5])
        torch.manual_seed(0)  # the same label dropout in both runs
        losses[backend] = []
        with promoe.dispatch_backend(model, backend):
            for _ in range(6):
                loss, _ = RectifiedFlow().loss(model, x0, labels, generator)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses[backend].append(loss.item())
    assert losses["loop"][-1] < losses["loop"][0]
    # The loss of step s has seen s forwards and s - 1 backwards and updates in the kernels' order of the sums.
    sums = (*dit_reduction_lengths(model.config, images=6), x0.numel())
    for step, (got, expected) in enumerate(zip(losses["triton"], losses["loop"]), start=1):
        assert got == pytest.approx(expected, rel=reordered_steps_tolerance(step, *sums)), step
