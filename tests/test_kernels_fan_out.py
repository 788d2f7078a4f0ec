"""The x-gradient kernel: `fan_out`'s backward sums its readers' gradients in one pass, as autograd's adds would
(the definition), under Triton's interpreter on the CPU."""

import pytest
import torch

import promoe
from promoe.kernels.fan_out import fan_out, sum_gradients
from promoe.zoo import build_mlp
from tests.helpers import TINY, reordered_sums_tolerance

pytestmark = pytest.mark.order_sensitive  # two summation orders at derived tolerances (see pytest.ini)

TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
              torch.float16: dict(rtol=2e-3, atol=2e-3)}


def sum_tolerance(dtype, terms: int, expected: torch.Tensor) -> dict:
    """fp32: `terms` gradients added in the kernel's order against float64's or autograd's; others: their rounding."""
    if dtype != torch.float32:
        return TOLERANCES[dtype]
    return reordered_sums_tolerance(terms, magnitude=expected.abs().max().item() if expected.numel() else 0.0)
SHAPES = [(0, 8), (1, 5), (37, 24), (129, 40)]  # none, one row, and sizes off the 1024-element block


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("terms", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_sum_gradients_matches_the_float64_sum(shape, terms, dtype, rng, monkeypatch):
    import promoe.kernels.fan_out as module

    monkeypatch.setattr(module, "empty_output", lambda s, d, dev: torch.full(s, float("nan"), dtype=d, device=dev))
    grads = [torch.randn(shape, generator=rng).to(dtype) for _ in range(terms)]
    total = sum_gradients(grads)
    expected = torch.stack([g.double() for g in grads]).sum(0)
    assert total.dtype == dtype and total.shape == shape
    torch.testing.assert_close(total.double(), expected, **sum_tolerance(dtype, terms, expected))


def test_sum_gradients_reads_strided_inputs_and_refuses_mismatched_ones(rng):
    wide = torch.randn(10, 16, generator=rng)
    strided = wide[:, ::2]
    other = torch.randn(10, 8, generator=rng)
    torch.testing.assert_close(sum_gradients([strided, other]), strided + other)
    with pytest.raises(ValueError, match="one shape and dtype"):
        sum_gradients([other, other.double()])
    with pytest.raises(ValueError, match="1 to 4"):
        sum_gradients([other] * 5)


def test_sum_gradients_op_passes_opcheck(rng):
    grads = [torch.randn(7, 24, generator=rng) for _ in range(3)]
    torch.library.opcheck(torch.ops.promoe.sum_gradients.default, (grads,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fan_out_gives_x_the_gradient_of_four_readers_and_skips_the_unused(dtype, rng):
    x = torch.randn(21, 12, generator=rng, dtype=dtype, requires_grad=True)
    weights = [torch.randn(12, 12, generator=rng, dtype=dtype) for _ in range(4)]

    def loss(views):
        a, b, c, d = views
        return (a @ weights[0]).tanh().sum() + (b @ weights[1]).square().sum() + (c * 3).sum() + 0 * d.sum()

    fused = torch.autograd.grad(loss(fan_out(x, 4)), x)[0]
    expected = torch.autograd.grad(loss((x,) * 4), x)[0]
    torch.testing.assert_close(fused, expected, **sum_tolerance(dtype, 4, expected))
    unused = fan_out(x, 3)  # a reader without a gradient (a layer in eval mode reads no loss input)
    torch.testing.assert_close(torch.autograd.grad(unused[0].sum() + unused[2].sum(), x)[0], torch.full_like(x, 2))


@pytest.mark.parametrize("name", ["ProMoE-S", "TC-DiT-S-E4", "ProMoE-EC-S"])
def test_a_triton_layer_gives_x_the_gradient_of_the_torch_layer(name, rng):
    """Routing, losses, shared experts and dispatch each read a view of x; the kernel sums what autograd summed."""
    layer = build_mlp(promoe.model_config(name, **TINY), block_index=1).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.3)
    x = torch.randn(3, 16, TINY["hidden_size"], generator=rng)
    labels = torch.tensor([1, 10, 3])
    grads = {}
    for backend in ("torch", "triton"):
        with promoe.dispatch_backend(layer, backend):
            x_in = x.clone().requires_grad_()
            y, aux = layer(x_in, labels)
            (y.square().sum() + sum(aux.values(), torch.zeros(()))).backward()
            grads[backend] = x_in.grad
    # The layer's sums in each backend's order (the router's norms and cosines or gate, an expert's up and down,
    # the combine of a token's experts, the aux losses' means over the 48 tokens), forward then backward.
    dim = TINY["hidden_size"]
    forward = (dim, dim, dim, 4 * dim, 5, 48)
    torch.testing.assert_close(grads["triton"], grads["torch"], **reordered_sums_tolerance(
        *forward, *forward, magnitude=grads["torch"].abs().max().item()))
