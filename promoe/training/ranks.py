"""The process group, and the small all-reduces by which every rank takes the same decision."""

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); a single process becomes a group of one so that one code path serves both."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 20000))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])  # the device comes from the local rank, never the global one
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


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
