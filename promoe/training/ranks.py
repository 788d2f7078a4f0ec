"""The small all-reduces by which every rank takes the same decision (the process group is promoe.distributed's)."""

import re
from contextlib import contextmanager

import torch
import torch.distributed as dist

from promoe.distributed import TIMEOUT_VARIABLE, collective_timeout


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a decision all ranks must take together)."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (FSDP2's parameters and gradient norms), a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor, its local shard (a view of its storage); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def average_over_ranks(buffers: list[torch.Tensor], world_size: int) -> None:
    for buffer in buffers:
        if world_size > 1:
            dist.all_reduce(buffer)
            buffer /= world_size


class AllRanksStop(SystemExit):
    """A verdict every rank reaches alike (the config's errors, `stop_if_any`'s, a divergence): said once, by rank 0."""


# What gloo ("Timed out waiting 2000ms for recv") and nccl's watchdog ("... before timing out") say of a collective
# that outlasted the process group's timeout.
TIMED_OUT = re.compile(r"timed out|timing out", re.IGNORECASE)
FIRST_FAILURE = "promoe/first_failure"  # the store's key of the first rank's own error: "<rank>\n<message>"


@contextmanager
def said_once():
    """Errors of a run with several ranks reach the user once each, in one line. A verdict every rank reaches alike
    (`AllRanksStop`) is said by rank 0 alone; the other ranks exit with status 1 quietly. A rank's own error (a
    SystemExit with a message: a file only it reads is damaged) is said by that rank, which also records it in the
    process group's store; a rank that a peer's exit then stops in a collective says which rank failed and its
    message, instead of the backend's traceback; a rank whose collective outlasted the process group's timeout (a
    peer hung, or died unheard) says so and how to change the wait."""
    try:
        yield
    except AllRanksStop as stop:
        if dist.get_rank() == 0 or not isinstance(stop.code, str):
            raise
        raise SystemExit(1) from None
    except SystemExit as stop:
        if dist.get_world_size() == 1 or not isinstance(stop.code, str):
            raise
        record_failure(stop.code)
        raise SystemExit(f"{rank_prefix()}{stop.code.removeprefix('error: ')}") from None
    except RuntimeError as error:  # a collective that a peer's exit broke (gloo: "Connection closed by peer")
        first = dist.get_world_size() > 1 and recorded_failure()
        if first:
            rank, message = first
            raise SystemExit(f"{rank_prefix()}stopped because rank {rank} failed: {message}") from None
        if dist.get_world_size() > 1 and TIMED_OUT.search(str(error)):
            raise SystemExit(f"{rank_prefix()}the other ranks did not join a collective within "
                             f"{collective_timeout().total_seconds():g} s: one hangs, or died without a message "
                             f"(see its output); {TIMEOUT_VARIABLE}=<seconds> sets this wait") from None
        raise


def rank_prefix() -> str:
    return f"error (rank {dist.get_rank()} of {dist.get_world_size()}): "


def record_failure(message: str) -> None:
    """Record this rank's error in the process group's store, where the other ranks look when a collective fails;
    the first rank to fail keeps the record."""
    try:
        store = dist.distributed_c10d._get_default_store()
        if store.add(FIRST_FAILURE + "/count", 1) == 1:
            store.set(FIRST_FAILURE, f"{dist.get_rank()}\n{message.removeprefix('error: ')}")
    except (RuntimeError, ValueError):  # no store (the peer hosting it is gone): the message is said all the same
        pass


def recorded_failure() -> tuple[int, str] | None:
    """(rank, message) of the first rank that recorded its error, or None (none did, or the store is gone)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        if not store.check([FIRST_FAILURE]):
            return None
        rank, _, message = store.get(FIRST_FAILURE).decode().partition("\n")
        return int(rank), message
    except (RuntimeError, ValueError):
        return None


def stop_if_any(message: str | None) -> None:
    """Every rank stops when one has found a reason (`message`); rank 0 says the first one found."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    reasons = [reason for reason in gathered if reason is not None]
    if reasons:
        raise AllRanksStop(reasons[0])
