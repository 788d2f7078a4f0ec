"""DESIGN.md 6.1: zero host synchronisations in a MoE layer's forward + backward on the `torch` path.

A tensor on the `meta` device has a shape and a dtype but no data, so every operation that would need the
data on the host (`.item()`, `nonzero`, boolean-mask indexing, a data-dependent output shape) raises there.
Running the whole model forward and backward on `meta` proves the path free of them, on the CPU, without a GPU.
(bf16: the meta kernel of grouped_mm follows the CUDA one, which takes bf16.)
"""

import pytest
import torch

import promoe
from promoe.counters import OpCounter
from tests.helpers import TINY

MODELS = {
    "promoe-top2": ("ProMoE-S", dict(experts="E6A2S1U1")),
    "promoe-ec": ("ProMoE-EC-S", {}),
    "tc-dit": ("TC-DiT-S", dict(experts="E4A2S0U0")),
    "ec-dit": ("EC-DiT-S", {}),
    "diffmoe": ("DiffMoE-S-E4", {}),
    "kmeans": ("ProMoE-S", dict(router="kmeans")),
    "classifier": ("ProMoE-S", dict(router="classifier", superclasses=[0, 1] * 5, experts="E4A1S1U1")),
}


def run_on_meta(name, overrides, training, backend):
    model = promoe.build_model(name, device="meta", dtype=torch.bfloat16, **TINY, **overrides).train(training)
    x = torch.randn(4, 4, 8, 8, device="meta", dtype=torch.bfloat16)
    t, y = torch.rand(4, device="meta"), torch.randint(0, 11, (4,), device="meta")
    with promoe.dispatch_backend(model, backend):
        out, aux = model(x, t, y, return_aux=True)
        (out.float().sum() + sum(aux.values(), torch.zeros((), device="meta"))).backward()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("model", MODELS)
def test_torch_backend_runs_on_meta_tensors_so_it_never_syncs_with_the_host(model, training):
    run_on_meta(*MODELS[model], training, "torch")


def test_the_meta_check_catches_the_loop_backend_which_does_sync():
    with pytest.raises(NotImplementedError, match="nonzero"):
        run_on_meta(*MODELS["promoe-top2"], True, "loop")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model", ["promoe-top2", "promoe-ec", "tc-dit", "diffmoe"])
def test_no_op_that_syncs_with_the_host_in_a_moe_layer_forward_and_backward(model, backend):
    from promoe.zoo import build_mlp

    name, overrides = MODELS[model]
    layer = build_mlp(promoe.model_config(name, **TINY, **overrides), block_index=1).train()
    x = torch.randn(4, 16, TINY["hidden_size"], requires_grad=True)
    labels = torch.tensor([1, 10, 3, 4])
    with OpCounter() as recorder, promoe.dispatch_backend(layer, backend):
        out, aux = layer(x, labels)
        (out.square().sum() + sum(aux.values(), torch.zeros(()))).backward()
    assert recorder.syncs == []


def test_the_sync_recorder_catches_the_loop_backend():
    from promoe.zoo import build_mlp

    layer = build_mlp(promoe.model_config("ProMoE-S", **TINY), block_index=1)
    with OpCounter() as recorder, promoe.dispatch_backend(layer, "loop"):
        layer(torch.randn(2, 16, TINY["hidden_size"]), torch.tensor([1, 2]))
    assert "boolean-mask indexing" in recorder.syncs
