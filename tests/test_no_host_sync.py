"""DESIGN.md 6.1: zero host synchronisations in a MoE layer's forward + backward on the `torch` path.

A tensor on the `meta` device has a shape and a dtype but no data, so every operation that would need the
data on the host (`.item()`, `nonzero`, boolean-mask indexing, a data-dependent output shape) raises there.
Running the whole model forward and backward on `meta` proves the path free of them, on the CPU, without a GPU.
(bf16: the meta kernel of grouped_mm follows the CUDA one, which takes bf16.)
"""

import pytest
import torch

import promoe
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
    with promoe.dispatch_backend(backend):
        out, aux = model(x, t, y, return_aux=True)
        (out.float().sum() + sum(aux.values(), torch.zeros((), device="meta"))).backward()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("model", MODELS)
def test_torch_backend_runs_on_meta_tensors_so_it_never_syncs_with_the_host(model, training):
    run_on_meta(*MODELS[model], training, "torch")


def test_the_meta_check_catches_the_loop_backend_which_does_sync():
    with pytest.raises(NotImplementedError, match="nonzero"):
        run_on_meta(*MODELS["promoe-top2"], True, "loop")


class HostSyncRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that makes a GPU wait for the host: a scalar read (`.item()`, `bool()`), or an op whose
    output shape depends on the data."""

    DATA_DEPENDENT = {"aten::nonzero", "aten::masked_select", "aten::_unique", "aten::_unique2", "aten::unique_dim",
                      "aten::unique_consecutive", "aten::_local_scalar_dense"}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in self.DATA_DEPENDENT:
            self.syncs.append(name)
        elif name == "aten::index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.syncs.append("boolean-mask indexing")
        elif name == "aten::repeat_interleave" and isinstance(args[0], torch.Tensor) and args[0].dtype != torch.bool \
                and kwargs.get("output_size") is None and "self_Tensor" not in str(func):
            self.syncs.append("repeat_interleave without output_size")
        return func(*args, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model", ["promoe-top2", "promoe-ec", "tc-dit", "diffmoe"])
def test_no_op_that_syncs_with_the_host_in_a_moe_layer_forward_and_backward(model, backend):
    from promoe.zoo import build_mlp

    name, overrides = MODELS[model]
    layer = build_mlp(promoe.model_config(name, **TINY, **overrides), block_index=1).train()
    x = torch.randn(4, 16, TINY["hidden_size"], requires_grad=True)
    labels = torch.tensor([1, 10, 3, 4])
    with HostSyncRecorder() as recorder, promoe.dispatch_backend(backend):
        out, aux = layer(x, labels)
        (out.square().sum() + sum(aux.values(), torch.zeros(()))).backward()
    assert recorder.syncs == []


def test_the_sync_recorder_catches_the_loop_backend():
    from promoe.zoo import build_mlp

    layer = build_mlp(promoe.model_config("ProMoE-S", **TINY), block_index=1)
    with HostSyncRecorder() as recorder, promoe.dispatch_backend("loop"):
        layer(torch.randn(2, 16, TINY["hidden_size"]), torch.tensor([1, 2]))
    assert "boolean-mask indexing" in recorder.syncs
