"""The model of a run, in torchtitan's order: built on `meta` (no storage), activation checkpointing, torch.compile
per block, `fully_shard` per block and then the root (on several ranks, or to compute in bf16), materialised on the
device (`to_empty`) and initialised.

The initial weights of a seed are those of a single-process CPU build (the model's own `initialize_weights`), on
every rank and whatever the world size: each rank builds them seeded alike and keeps its shards. A run on two
ranks therefore starts from the weights of a run on one, and DTensor's random ops (exact per shard only on CUDA)
are never needed. The cost is one transient full copy of the fp32 weights in host memory per rank.
"""

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from promoe.train_config import RunConfig
from promoe.training.expert_parallel import apply_expert_parallel, local_rows, shard_banks
from promoe.training.ranks import AllRanksStop
from promoe.zoo import build_from_config


def compute_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def running_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Statistics that routers update in forward (k-means centroids, DiffMoE thresholds), averaged over ranks."""
    return [buffer for module in model.modules() if hasattr(module, "running_stats")
            for buffer in module.running_stats()]


def build_on_meta(config: RunConfig) -> torch.nn.Module:
    """The run's model with shapes and no storage: nothing is allocated before it is sharded."""
    return build_from_config(config.model_config(), device="meta")


class Checkpointed(torch.nn.Module):
    """A block whose forward is recomputed in backward (torchtitan's `checkpoint_wrapper`). It is swapped into the
    block's class, as `fully_shard` swaps in `FSDPModule`, rather than wrapped around it: a wrapper module would add
    a level to every parameter name that the checkpoints, the EMA and the expert banks are keyed by.

    `compile` compiles the block inside its checkpoint, which stays eager. A checkpoint that Dynamo traces is one
    region (a higher-order op) that can hold neither a graph break (the expert-parallel exchange) nor a Python side
    effect (the routing record's plan hooks): with either, Dynamo ran the whole MoE block eagerly. Compiled inside,
    the block's graphs run again in backward, what they saved for it dropped in between. (The checkpoint called
    through `functools.partial`, as before, made Dynamo skip every block: nothing was compiled.)"""

    def forward(self, *args):
        return checkpoint(self.recomputed, *args, use_reentrant=False)

    def recomputed(self, *args):
        return super().forward(*args)

    def compile(self, **kwargs) -> None:
        self.recomputed = torch.compile(self.recomputed, **kwargs)


def checkpointed(block: torch.nn.Module) -> None:
    """`block` recomputes its forward in backward from now on (`Checkpointed`)."""
    cls = type(block)
    block.__class__ = type(f"Checkpointed{cls.__name__}", (Checkpointed, cls), {})


def apply_activation_checkpointing(model: torch.nn.Module, config: RunConfig) -> None:
    """With train.activation_checkpointing, each block recomputes its forward in backward."""
    if not config.train.activation_checkpointing:
        return
    if running_buffers(model):
        raise AllRanksStop(f"train.activation_checkpointing: the router of {config.model.name} updates running "
                           "statistics in forward, which a recomputation would update twice; turn it off")
    for block in model.blocks:
        checkpointed(block)


# What train.compile compiles with. Dynamo's graphs and breaks do not depend on it: the tests count them with
# "aot_eager" (AOTAutograd's graphs run by eager kernels), minutes faster to compile on the CPU.
COMPILE_BACKEND = "inductor"


def apply_compile(model: torch.nn.Module, config: RunConfig) -> None:
    """With train.compile, each block is compiled (inside its checkpoint, where it has one: `Checkpointed`); FSDP's
    hooks, which `fully_shard` adds next, stay out of the graphs (Dynamo skips them). The routers' running
    statistics are buffer updates that compile as such: k-means and DiffMoE train to the eager losses."""
    if not config.train.compile:
        return
    for block in model.blocks:
        block.compile(backend=COMPILE_BACKEND)


def compile_counts() -> str:
    """What Dynamo compiled so far in this process, in a few words: graphs, the frames they came from, graph
    breaks (`torch._dynamo.utils.counters`, cumulative)."""
    from torch._dynamo.utils import counters

    return (f"{counters['stats']['unique_graphs']} graphs from {counters['frames']['total']} frames, "
            f"{sum(counters['graph_break'].values())} graph breaks")


def shard(model: torch.nn.Module, dtype: torch.dtype, reshard: bool = True) -> None:
    """fully_shard each block, then the root. Parameters are stored in fp32 and gathered in `dtype`; gradients
    are reduced in fp32. With `reshard`, a block's gathered parameters are freed after its forward and gathered
    again in backward; the final layer runs right after the last block, whose parameters the backward needs at
    once, so the last block is never resharded. The root keeps its inputs as they are: a bf16 timestep s * 1000
    would move in steps of 4 above 512, unlike the sampler's."""
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for index, block in enumerate(model.blocks):
        reshard_block = reshard and index < len(model.blocks) - 1
        shard_banks(block, policy, reshard_block)  # expert parallelism's banks, already cut: over their replicas
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_block)
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                                      cast_forward_inputs=False))


@torch.no_grad()
def materialise_and_initialise(model: torch.nn.Module, config: RunConfig, device: torch.device) -> None:
    """Storage on `device` for the sharded model, then the seed's initial weights and buffers (see the module's
    docstring): each rank keeps its shard of every parameter."""
    model.to_empty(device=device)
    torch.manual_seed(config.train.seed)
    initial = build_from_config(config.model_config(), device="cpu")
    values = {**dict(initial.named_parameters()), **dict(initial.named_buffers())}
    cut = local_rows(model)  # the banks of expert parallelism: this rank's rows
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        value = (values[name][cut[name]] if name in cut else values[name]).to(device)
        if isinstance(tensor, DTensor):
            value = distribute_tensor(value, tensor.device_mesh, tensor.placements, src_data_rank=None)
        tensor.copy_(value)


def needs_sharding(dtype: torch.dtype) -> bool:
    """fully_shard only where it does work: across ranks, or to gather fp32 parameters in a lower precision. On
    one process in fp32 it would only copy (the gather and the reduce-scatter of one rank) and wrap every parameter
    in a DTensor, whose Python dispatch slows the optimizer, the EMA and the gradient clipping: on 2 CPU cores it
    made the ProMoE-S step 5-11% slower (bench/official_step.py). torchtitan also shards only when dp_shard > 1.
    Checkpoints are alike either way, so a run moves between world sizes."""
    return dist.get_world_size() > 1 or dtype != torch.float32


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Whether the next backward reduces the gradients over ranks (FSDP2); without, they add up where they are:
    a step's micro-batches reduce once, in the last backward."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def parallelise(model: torch.nn.Module, config: RunConfig, device: torch.device) -> None:
    """A model built on `meta` made ready to train: the experts spread over ranks (`train.expert_parallel`),
    activation checkpointing, torch.compile per block, fully_shard
    per block then the root (where it does work), materialised on `device` and initialised alike on every rank."""
    dtype = compute_dtype(config, device)
    apply_expert_parallel(model, config, device)
    apply_activation_checkpointing(model, config)
    apply_compile(model, config)
    if needs_sharding(dtype):
        # On one process (bf16) "sharded" is whole, and regathering a block in backward is only a copy: keeping
        # the blocks gathered made the ProMoE-S step on 2 CPU cores 4-5% faster (bench/compile_step.py) for one
        # more copy of the parameters held from forward to backward.
        shard(model, dtype, reshard=dist.get_world_size() > 1)
    materialise_and_initialise(model, config, device)
