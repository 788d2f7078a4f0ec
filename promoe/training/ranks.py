"""The small all-reduces by which every rank takes the same decision (the process group is promoe.distributed's)."""

from contextlib import contextmanager

import torch
import torch.distributed as dist


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a decision all ranks must take together)."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (FSDP2's parameters and gradient norms), a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def average_over_ranks(buffers: list[torch.Tensor], world_size: int) -> None:
    for buffer in buffers:
        if world_size > 1:
            dist.all_reduce(buffer)
            buffer /= world_size


@contextmanager
def said_once():
    """A verdict every rank reaches alike (a SystemExit with a message) is said by rank 0 alone; the other ranks
    exit with status 1 quietly, so a user error reads once, not once per rank."""
    try:
        yield
    except SystemExit as stop:
        if dist.get_rank() == 0 or not isinstance(stop.code, str):
            raise
        raise SystemExit(1) from None


def stop_if_any(message: str | None) -> None:
    """Every rank stops when one has found a reason (`message`); rank 0 says the first one found."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    reasons = [reason for reason in gathered if reason is not None]
    if reasons:
        raise SystemExit(reasons[0])
