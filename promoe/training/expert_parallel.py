"""Expert parallelism in a training run (`train.expert_parallel`: ep ranks share each MoE layer's routed experts).

The ranks form a device mesh (world / ep, ep): along `expert`, the ep ranks of a group exchange tokens and hold one
E / ep share each of every layer's routed experts; along `replica`, the ranks that hold the same share. A bank is
cut to this rank's rows (`ExpertGroup.bank_rows`: its routed experts, then the unconditional ones) before the
model is sharded, and FSDP2 shards those rows over `replica` (torchtitan's layout: split by expert over `expert`,
FSDP over the rest), on dim 1 (`Shard(1)`: D or H), so that every shard holds every one of the rank's rows, the
unconditional ones of the same shape on every rank of a group even where E % ep != 0. A rank thus holds about
1 / world of each bank's weights, gradients, Adam moments and EMA, whatever ep is; every other parameter is sharded
by FSDP2 over all ranks, as without expert parallelism. A size-1 `replica` (ep = world) takes the same path. So
that a step equals the one without:

- gradients: a routed expert's gradient already holds the contributions of every token of its group (they came
  back through the all-to-all); FSDP2's reduce-scatter sums it over its replicas and divides by the world size
  (`set_gradient_divide_factor`), as FSDP2 averages the others. The unconditional experts' rows are summed in
  addition over the `expert` group, on the reduce-scattered shard: one flat all-reduce per MoE layer, started,
  without waiting, as soon as FSDP2 hands the layer's sharded gradients over in the step's last backward
  (`BankGradientSums`), while the backward goes on through the layers before it.
- the gradient norm counts each distinct gradient once (the routed shards are distinct on every rank; the
  unconditional shards repeat along `expert`), with FSDP2's shards.
- checkpoints hold whole banks, written and read by each rank as its own shard of its own rows at their offsets in
  the whole (`BankRows`): no rank gathers a bank, and a run resumes on another expert-parallel degree (or without).
  The EMA export, one file on rank 0, gathers each bank there alone (over `replica`, then over `expert`).
"""

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from promoe.moe.expert_parallel import ExpertGroup
from promoe.moe.layer import moe_layers
from promoe.train_config import RunConfig
from promoe.training.ranks import AllRanksStop, full, local_part


def apply_expert_parallel(model: nn.Module, config: RunConfig, device: torch.device) -> None:
    """Give every MoE layer of a model built on `meta` its expert group and cut its bank to this rank's rows (which
    `shard_banks` then shards over the group's replicas)."""
    degree = config.train.expert_parallel
    if degree == 1:
        return
    layers = moe_layers(model)
    refusal = expert_parallel_refusal(layers, degree, config.model.name)
    if refusal is None:
        refusal = bank_width_refusal(layers, config.model.name, dist.get_world_size() // degree)
    if refusal:
        raise AllRanksStop(f"train.expert_parallel={degree}: {refusal}")
    world_size = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world_size // degree, degree), mesh_dim_names=("replica", "expert"))
    for layer in layers:
        bank_size = layer.experts.num_experts
        group = ExpertGroup(mesh.get_group("expert"), mesh["replica"], degree, mesh.get_local_rank("expert"),
                            layer.router.num_routed, bank_size - layer.router.num_routed)
        layer.spread_experts(group)
        rows = len(group.bank_rows())
        for name, param in list(layer.experts.named_parameters()):
            setattr(layer.experts, name, nn.Parameter(param.new_empty((rows, *param.shape[1:]))))


def expert_parallel_refusal(layers: list, degree: int, model_name: str) -> str | None:
    """Why a model cannot spread its experts over `degree` ranks, or None."""
    if not layers:
        return f"{model_name} has no MoE layer"
    if not all(layer.router.token_choice for layer in layers):
        return (f"{model_name} routes by expert choice (EC-DiT, ProMoE-EC, DiffMoE), whose capacities and thresholds "
                "are untested across ranks: expert parallelism serves token-choice routers (ProMoE, TC-DiT); use 1")
    routed = layers[0].router.num_routed
    if routed < degree:
        return f"{model_name} has {routed} routed experts per layer, fewer than the {degree} ranks to hold them"
    return None


def bank_width_refusal(layers: list, model_name: str, replicas: int) -> str | None:
    """Why the banks cannot be sharded on dim 1 over `replicas` ranks (FSDP2 shards dims other than 0 evenly
    only), or None."""
    widths = sorted({width for layer in layers for width in layer.experts.w_up_EDH.shape[1:]})
    if any(width % replicas for width in widths):
        return (f"the experts' widths {widths} of {model_name} must divide by the {replicas} ranks that hold each "
                "share (world size / expert_parallel), over which their banks are sharded on that dim")
    return None


def shard_banks(block: nn.Module, policy: MixedPrecisionPolicy, reshard: bool) -> None:
    """fully_shard each expert-parallel bank of `block` over its replicas, on dim 1 (see the module's docstring),
    before the block itself (whose FSDP2 then leaves the bank's parameters to it). Its reduce-scatter divides by
    the world size: the routed rows' average over every rank, as FSDP2 averages the block's other gradients."""
    for layer in moe_layers(block):
        if layer.expert_group is None:
            continue
        fully_shard(layer.experts, mesh=layer.expert_group.replicas, mp_policy=policy,
                    reshard_after_forward=reshard, shard_placement_fn=lambda _: Shard(1))
        layer.experts.set_gradient_divide_factor(dist.get_world_size())
        # gloo has no PREMUL_SUM (NCCL's divide-in-the-sum): sum, then divide. Not on one replica, where FSDP2
        # (torch 2.13) copies without a collective and divides, and would divide a second time when forced.
        if dist.get_backend() == "gloo" and layer.expert_group.replicas.size() > 1:
            layer.experts.set_force_sum_reduction_for_comms(True)


def expert_banks(model: nn.Module) -> dict[str, tuple[nn.Parameter, ExpertGroup]]:
    """The bank parameters cut by expert parallelism, by name, with their layer's group (empty without it)."""
    return {f"{layer_name}.experts.{name}": (param, layer.expert_group)
            for layer_name, layer in model.named_modules()
            if getattr(layer, "expert_group", None) is not None
            for name, param in layer.experts.named_parameters()}


def local_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """Which rows of each whole bank parameter this rank holds, by name."""
    return {name: group.bank_rows() for name, (_, group) in expert_banks(model).items()}


def rows_on_first_replica(bank: torch.Tensor, group: ExpertGroup) -> torch.Tensor | None:
    """This rank's rows of a bank tensor (FSDP2's `Shard(1)` over the group's replicas) whole on the first of its
    replicas, gathered there (a collective of the replicas); None on the others. A plain tensor is its rows."""
    local = local_part(bank)
    if not isinstance(bank, DTensor):
        return local
    replicas = group.replicas.get_group()
    first = dist.get_global_rank(replicas, 0)
    gathered = [torch.empty_like(local) for _ in range(group.replicas.size())] if dist.get_rank() == first else None
    dist.gather(local.contiguous(), gathered, dst=first, group=replicas)
    return None if gathered is None else torch.cat(gathered, dim=1)


def whole_bank_on_rank_0(bank: torch.Tensor, group: ExpertGroup) -> torch.Tensor | None:
    """A bank tensor whole [E + U, ...] on rank 0, gathered over its replicas and then from the rows of rank 0's
    expert group (collectives of those groups; the other ranks return once their replicas' gather is done); None on
    every other rank, which holds its own shard only. Shares of unequal size travel padded to the largest."""
    local = rows_on_first_replica(bank, group)
    if local is None or 0 not in dist.get_process_group_ranks(group.group):
        return None
    routed = local.new_zeros((max(group.shares), *local.shape[1:]))
    routed[:group.local_routed] = local[:group.local_routed]
    gathered = [torch.empty_like(routed) for _ in range(group.size)] if dist.get_rank() == 0 else None
    dist.gather(routed, gathered, dst=0, group=group.group)
    if gathered is None:
        return None
    shares = [rows[:share] for rows, share in zip(gathered, group.shares)]
    return torch.cat([*shares, local[group.local_routed:]])


@dataclass
class _LayerBucket:
    """One MoE layer's bank gradients whose unconditional rows are summed together."""

    params: list[nn.Parameter]
    group: ExpertGroup
    ready: set[int] = field(default_factory=set)  # ids of the parameters whose gradient this backward finished
    # (the all-reduce under way, its flat buffer, the gradient rows it sums into), once started
    sums: list[tuple[dist.Work, torch.Tensor, list[torch.Tensor]]] = field(default_factory=list)


class BankGradientSums:
    """The sums of the banks' unconditional rows over the `expert` group (see the module's docstring), one bucket
    per MoE layer, each started asynchronously by a post-accumulate-grad hook, which FSDP2 calls on a bank's
    sharded parameter once its reduce-scatter gave it the gradient, once the layer's gradients are all there in the
    step's last backward (`arm`), and finished by `finish` before the gradients are read. Every rank starts the
    buckets in the same order, from the last layer to the first (a bucket ready early waits for the ones after
    it), on expert groups of their own, apart from the token exchange's."""

    def __init__(self, model: nn.Module):
        layers = [layer for layer in reversed(moe_layers(model)) if layer.expert_group is not None]
        self.buckets = [_LayerBucket(list(layer.experts.parameters()), layer.expert_group) for layer in layers]
        # A collective: every rank makes every expert group at the same point. Ranks (replica r, expert e) are
        # r * ep + e on the mesh.
        degree, world_size = layers[0].expert_group.size, dist.get_world_size()
        self.uncond_group = dist.new_subgroups_by_enumeration(
            [list(range(first, first + degree)) for first in range(0, world_size, degree)])[0]
        self.started = 0  # buckets started this step, in order
        self.armed = False
        for bucket in self.buckets:
            for param in bucket.params:
                param.register_post_accumulate_grad_hook(functools.partial(self._gradient_ready, bucket))

    def arm(self) -> None:
        """The next backward is the step's last: start each bucket when its gradients are complete."""
        self.armed = True

    def _gradient_ready(self, bucket: _LayerBucket, param: torch.Tensor) -> None:
        if not self.armed:
            return
        bucket.ready.add(id(param))
        while self.started < len(self.buckets) and self._complete(self.buckets[self.started]):
            self._start(self.buckets[self.started])

    @staticmethod
    def _complete(bucket: _LayerBucket) -> bool:
        return len(bucket.ready) == len(bucket.params)

    def _start(self, bucket: _LayerBucket) -> None:
        for param in bucket.params:  # a layer that ran no token on this rank still takes part, with zeros
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        rows = [local_part(param.grad)[bucket.group.local_routed:] for param in bucket.params]
        flat = torch.cat([row.flatten() for row in rows])
        if flat.numel() > 0:  # a bank without unconditional experts has nothing to sum
            bucket.sums.append((dist.all_reduce(flat, group=self.uncond_group, async_op=True), flat, rows))
        self.started += 1

    def finish(self) -> None:
        """Every bucket summed (those not started yet are started now)."""
        while self.started < len(self.buckets):
            self._start(self.buckets[self.started])
        for bucket in self.buckets:
            for work, flat, rows in bucket.sums:
                work.wait()
                for row, summed in zip(rows, flat.split([row.numel() for row in rows])):
                    row.copy_(summed.view_as(row))
            bucket.ready.clear()
            bucket.sums.clear()
        self.started, self.armed = 0, False


def bank_gradient_sums(model: nn.Module) -> BankGradientSums | None:
    """The model's `BankGradientSums` (None without expert parallelism), made on first use: its hooks go on the
    banks' parameters as materialised (`to_empty` replaces the ones built on `meta`)."""
    if not expert_banks(model):
        return None
    if getattr(model, "_bank_gradient_sums", None) is None:
        model._bank_gradient_sums = BankGradientSums(model)
    return model._bank_gradient_sums


def sum_bank_gradients_in_backward(model: nn.Module, last: bool) -> None:
    """Before each backward of a step: whether it is the last, in which the banks' sums start (see
    `BankGradientSums`); the others only add up gradients on this rank."""
    sums = bank_gradient_sums(model)
    if sums is not None and last:
        sums.arm()


def sync_expert_gradients(model: nn.Module) -> None:
    """Each bank gradient made the step's average over all ranks (see the module's docstring): the sums started in
    the last backward, finished."""
    sums = bank_gradient_sums(model)
    if sums is not None:
        sums.finish()


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a total norm of `max_norm`; the norm before clipping."""
    banks = expert_banks(model)
    if not banks:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    bank_ids = {id(param) for param, _ in banks.values()}
    others = [param for param in model.parameters() if id(param) not in bank_ids and param.grad is not None]
    total_sq = full(torch.nn.utils.get_total_norm([param.grad for param in others])).float().square()
    # Every rank's shard of its routed rows is a distinct gradient; the unconditional rows' shards repeat along
    # `expert`, counted on its first rank only. One sum over all ranks, all banks at once.
    bank_sq = torch.stack([squares(local_part(param.grad), group) for param, group in banks.values()]).sum()
    dist.all_reduce(bank_sq)
    total = (total_sq + bank_sq).sqrt()
    # Two calls: the fused kernels take the tensors of one device mesh at a time (FSDP2's over all ranks, the banks'
    # over their replicas).
    torch.nn.utils.clip_grads_with_norm_(others, max_norm, total)
    torch.nn.utils.clip_grads_with_norm_([param for param, _ in banks.values()], max_norm, total)
    return total


def squares(grad: torch.Tensor, group: ExpertGroup) -> torch.Tensor:
    """The sum of squares of this rank's distinct part of a bank gradient shard (see `clip_gradients`)."""
    distinct = grad if group.index == 0 else grad[:group.local_routed]
    return distinct.float().square().sum()


def bank_entries(model: nn.Module, state: dict) -> list[tuple[dict, str, ExpertGroup]]:
    """Where a checkpoint state {"model", "optim", "ema"} holds this rank's rows of a bank: (dict, key, group). The
    optimizer's per-parameter dicts are copied first, so that replacing an entry leaves the optimizer's own."""
    entries = []
    for name, (_, group) in expert_banks(model).items():
        entries += [(state["model"], name, group), (state["ema"], name, group)]
        optim_state = state["optim"]["state"]
        if name in optim_state:
            optim_state[name] = dict(optim_state[name])
            entries += [(optim_state[name], key, group) for key, value in optim_state[name].items()
                        if torch.is_tensor(value) and value.dim() > 0]
    return entries


def sharing_storage_exactly(rows: torch.Tensor) -> torch.Tensor:
    """Contiguous rows of a bigger tensor as a tensor of the same memory whose storage is exactly its bytes. DCP's
    writer copies a tensor whose storage is larger than it, and keeps each tensor it wrote until its file is
    complete: a rank's rows as views would be copied whole while it saves."""
    start = rows.storage_offset() * rows.element_size()
    storage = rows.untyped_storage()[start:start + rows.nbytes]  # a slice of a storage shares its memory
    return rows.new_empty(0).set_(storage, 0, rows.shape, rows.stride())


class BankRows(torch.Tensor):
    """A bank tensor as distributed checkpointing sees it: the whole bank's shape [E + U, ...], of which this rank
    holds two blocks, views of its own tensor (or of its FSDP2 shard, `Shard(1)` over its replicas: the block's
    columns on dim 1 at their offset): its routed experts at their offset in the whole, and the unconditional rows
    at E. DCP writes and reads each block at its offsets (the protocol DTensor implements for it:
    `__create_write_items__`, `__create_chunk_list__`, `__get_tensor_shard__`): the file holds whole banks whatever
    the degree (the blocks that ranks hold alike, the unconditional ones along `expert`, are deduplicated), a load
    reads into this rank's blocks from whatever blocks were written, and no rank ever holds more of a bank than its
    own shard. It carries no storage of its own and runs no op."""

    @staticmethod
    def __new__(cls, value: torch.Tensor, group: ExpertGroup):
        local = local_part(value)
        rows = torch.Tensor._make_wrapper_subclass(cls, (group.bank_size, *value.shape[1:]), dtype=local.dtype,
                                                   device=local.device)
        rows.local = value
        column = 0
        if isinstance(value, DTensor):
            if value.placements != (Shard(1),):
                raise ValueError(f"BankRows takes FSDP2's Shard(1) of a bank, not {value.placements}")
            column = local.shape[1] * value.device_mesh.get_local_rank()  # FSDP2 shards dims > 0 evenly
        # {(first row, first column) in the whole bank: this rank's block there}; an empty block (no unconditional
        # expert) is left out
        rows.blocks = {(start, column): sharing_storage_exactly(block)
                       for start, block in ((group.first_routed, local[:group.local_routed]),
                                            (group.num_routed, local[group.local_routed:]))
                       if block.numel() > 0}
        return rows

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"BankRows only travels to distributed checkpointing, it runs no op ({func} called)")

    def _chunks(self):
        for (start, column), block in self.blocks.items():
            yield block, ChunkStorageMetadata(offsets=torch.Size([start, column] + [0] * (block.dim() - 2)),
                                              sizes=block.shape)

    def __create_write_items__(self, fqn: str, _) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(
                              block), size=self.shape))
                for block, chunk in self._chunks()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [chunk for _, chunk in self._chunks()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.blocks[tuple(index.offset[:2])]


def with_bank_rows(model: nn.Module, state: dict) -> dict:
    """The checkpoint state to write or read into: every bank entry as its `BankRows` (the EMA dict copied, the live
    one kept). DCP writes each rank's rows of the whole bank, and loads into them in place."""
    state = {**state, "ema": dict(state["ema"])}
    for values, key, group in bank_entries(model, state):
        values[key] = BankRows(values[key], group)
    return state


def local_bank_rows(state: dict) -> dict:
    """`state` (after `with_bank_rows` and a load) with each `BankRows` given back as this rank's tensor, for
    `set_state_dict`."""
    def local(value):
        if isinstance(value, BankRows):
            return value.local
        return {key: local(item) for key, item in value.items()} if isinstance(value, dict) else value

    return local(state)
