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
from tests.helpers import TINY, in_two_ranks

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


def test_the_counter_sees_each_host_read_of_a_cpu_tensor():
    """On the CPU the data is already on the host, so `.tolist()` and `.cpu()` reach no aten op; they still count,
    as the syncs they are on an accelerator. Arithmetic does not."""
    x = torch.arange(6)
    reads = {".tolist()": lambda: x.tolist(), ".item()": lambda: x[0].item(), ".cpu()": lambda: x.cpu(),
             ".to('cpu')": lambda: x.to("cpu"),
             "boolean-mask indexing": lambda: x[x > 2], "aten::nonzero": x.nonzero,
             "bool(tensor)": lambda: bool(x[1] > 0), "aten::_local_scalar_dense": lambda: torch.arange(x[3])}
    for reason, read in reads.items():
        with OpCounter() as recorder:
            read()
        assert recorder.syncs == [reason]
    with OpCounter() as recorder:
        (x * 2).sum().to(torch.float32)
    assert recorder.syncs == []


def test_the_counter_sees_host_reads_in_backward():
    """The autograd engine runs a custom function's backward and a checkpoint's recomputation with no torch function
    mode active: the reads made there count too (a checkpointed expert-parallel layer reads its split sizes again)."""
    from torch.utils.checkpoint import checkpoint

    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            grad.sum().item()
            return grad

    def reads_its_sizes(x):
        x.detach().abs().long().tolist()
        return x * x  # saves x: backward recomputes the function

    x = torch.randn(4, requires_grad=True)
    with OpCounter() as recorder:
        (ReadsInBackward.apply(x) + checkpoint(reads_its_sizes, x, use_reentrant=False)).sum().backward()
    assert sorted(recorder.syncs) == [".item()", ".tolist()", ".tolist()"]


def test_host_reads_of_tensors_off_the_counted_device_do_not_count():
    with OpCounter("cuda") as recorder:  # a CPU tensor in a GPU run: already on the host
        torch.arange(6).tolist()
    assert recorder.syncs == []


def _count_expert_parallel_syncs(rank: int, port: int, backend: str, results: dict) -> None:
    import os

    import torch.distributed as dist

    from promoe.moe.expert_parallel import ExpertGroup
    from promoe.zoo import build_mlp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        layer = build_mlp(promoe.model_config("ProMoE-S", **TINY, experts="E6A2S1U1"), block_index=1).train()
        x = torch.randn(4, 16, TINY["hidden_size"], requires_grad=True)
        labels = torch.tensor([1, 10, 3, 4])
        counts = {}
        for setting in ("whole bank", "expert parallel"):
            if setting == "expert parallel":  # this rank keeps its 2 of the 4 routed experts and the unconditional one
                routed = layer.router.num_routed
                group = ExpertGroup(dist.group.WORLD, None, 2, rank, routed, layer.experts.num_experts - routed)
                for name, param in list(layer.experts.named_parameters()):
                    setattr(layer.experts, name, torch.nn.Parameter(param.detach()[group.bank_rows()]))
                layer.spread_experts(group)
            with promoe.dispatch_backend(layer, backend):
                with OpCounter() as forward:
                    out, aux = layer(x, labels)
                with OpCounter() as backward:
                    (out.square().sum() + sum(aux.values(), torch.zeros(()))).backward()
            counts[setting] = (forward.syncs, backward.syncs)
        results[rank] = counts
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_an_expert_parallel_layer_syncs_once_in_forward_and_never_in_backward(backend):
    """The split sizes of the token exchange are read on the host once per forward; the backward's exchange reuses
    them. The same layer with its whole bank does not sync at all."""
    results = in_two_ranks(_count_expert_parallel_syncs, backend)
    for rank in (0, 1):
        assert results[rank] == {"whole bank": ([], []), "expert parallel": ([".tolist()"], [])}, rank
