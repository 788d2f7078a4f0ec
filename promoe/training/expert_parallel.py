"""Expert parallelism in a training run (`train.expert_parallel`: ep ranks share each MoE layer's routed experts).

The ranks form a device mesh (world / ep, ep): along `expert`, the ep ranks of a group exchange tokens and hold one
E / ep share each of every layer's routed experts; along `replica`, the ranks that hold the same share. A bank is
cut to this rank's rows (`ExpertGroup.bank_rows`: its routed experts, then the unconditional ones) before the
model is sharded, and FSDP2 leaves it alone; every other parameter is sharded by FSDP2 over all ranks, as without
expert parallelism. So that a step equals the one without:

- gradients: a routed expert's gradient already holds the contributions of every token of its group (they came
  back through the all-to-all); it is summed over its replicas. The unconditional experts' gradient is summed
  over all ranks. Both are then divided by the world size, as FSDP2 averages the others.
- the gradient norm counts each distinct gradient once (a routed share on one rank of its group, the
  unconditional rows once), with FSDP2's shards.
- checkpoints and the EMA export hold whole banks, gathered when written and cut when read, so a run resumes
  on another expert-parallel degree (or without).
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh

from promoe.moe.expert_parallel import ExpertGroup
from promoe.moe.layer import moe_layers
from promoe.train_config import RunConfig
from promoe.training.ranks import full


def apply_expert_parallel(model: nn.Module, config: RunConfig, device: torch.device) -> None:
    """Give every MoE layer of a model built on `meta` its expert group and cut its bank to this rank's rows."""
    degree = config.train.expert_parallel
    if degree == 1:
        return
    layers = moe_layers(model)
    refusal = expert_parallel_refusal(layers, degree, config.model.name)
    if refusal:
        raise SystemExit(f"train.expert_parallel={degree}: {refusal}")
    world_size = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world_size // degree, degree), mesh_dim_names=("replica", "expert"))
    replicas = mesh.get_group("replica") if world_size > degree else None
    for layer in layers:
        bank_size = layer.experts.num_experts
        group = ExpertGroup(mesh.get_group("expert"), replicas, degree, mesh.get_local_rank("expert"),
                            layer.router.num_routed, bank_size - layer.router.num_routed)
        layer.expert_group = group
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


def expert_banks(model: nn.Module) -> dict[str, tuple[nn.Parameter, ExpertGroup]]:
    """The bank parameters cut by expert parallelism, by name, with their layer's group (empty without it)."""
    return {f"{layer_name}.experts.{name}": (param, layer.expert_group)
            for layer_name, layer in model.named_modules()
            if getattr(layer, "expert_group", None) is not None
            for name, param in layer.experts.named_parameters()}


def local_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """Which rows of each whole bank parameter this rank holds, by name."""
    return {name: group.bank_rows() for name, (_, group) in expert_banks(model).items()}


def whole_bank(local: torch.Tensor, group: ExpertGroup) -> torch.Tensor:
    """A bank tensor whole [E + U, ...] from this rank's rows (a collective of the expert group). Shares of
    unequal size travel padded to the largest."""
    largest = max(group.shares)
    routed = local.new_zeros((largest, *local.shape[1:]))
    routed[:group.local_routed] = local[:group.local_routed]
    gathered = [torch.empty_like(routed) for _ in range(group.size)]
    dist.all_gather(gathered, routed, group=group.group)
    shares = [rows[:share] for rows, share in zip(gathered, group.shares)]
    return torch.cat([*shares, local[group.local_routed:]])


def sync_expert_gradients(model: nn.Module) -> None:
    """Each bank gradient made the step's average over all ranks (see the module's docstring)."""
    world_size = dist.get_world_size()
    for param, group in expert_banks(model).values():
        routed, uncond = param.grad[:group.local_routed], param.grad[group.local_routed:]
        if group.replicas is not None:
            dist.all_reduce(routed, group=group.replicas)
        dist.all_reduce(uncond)
        param.grad /= world_size


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a total norm of `max_norm`; the norm before clipping."""
    banks = expert_banks(model)
    if not banks:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    bank_ids = {id(param) for param, _ in banks.values()}
    others = [param for param in model.parameters() if id(param) not in bank_ids and param.grad is not None]
    total_sq = full(torch.nn.utils.get_total_norm([param.grad for param in others])).float().square()
    for param, group in banks.values():
        routed_sq = param.grad[:group.local_routed].float().square().sum()
        dist.all_reduce(routed_sq, group=group.group)  # the group's shares: every routed expert once
        total_sq = total_sq + routed_sq + param.grad[group.local_routed:].float().square().sum()
    total = total_sq.sqrt()
    # Two calls: the fused kernels take DTensors (FSDP2's shards) or plain tensors (the banks), not both at once.
    torch.nn.utils.clip_grads_with_norm_(others, max_norm, total)
    torch.nn.utils.clip_grads_with_norm_([param for param, _ in banks.values()], max_norm, total)
    return total


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


def with_whole_banks(model: nn.Module, state: dict) -> dict:
    """The checkpoint state to write: every bank entry whole (the EMA dict copied, the live one kept)."""
    state = {**state, "ema": dict(state["ema"])}
    for values, key, group in bank_entries(model, state):
        values[key] = whole_bank(values[key], group)
    return state


def load_whole_banks(model: nn.Module, state: dict, load) -> None:
    """`load(state)` with each bank entry read whole, then cut back into this rank's tensors in `state`."""
    cut = []
    for values, key, group in bank_entries(model, state):
        local = values[key]
        values[key] = local.new_empty((group.bank_size, *local.shape[1:]))
        cut.append((values, key, local, group.bank_rows().to(local.device)))
    load(state)
    for values, key, local, rows in cut:
        local.copy_(values[key][rows])
        values[key] = local
