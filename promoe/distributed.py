"""The process of a run among its ranks, for training and sampling alike: under torchrun a process group (nccl on
CUDA, else gloo) and this rank's device.

A rank waits at most `collective_timeout()` for the others in a collective (PROMOE_COLLECTIVE_TIMEOUT seconds, 30
minutes by default, for nccl and gloo alike): a peer that hangs or dies, leaving the others in a collective, ends the
run (promoe.training.ranks.said_once says so in one line) instead of leaving them waiting for ever. It must outlast
the longest work one rank does while the others wait (rank 0's end of a run: the plots, the sample grid, the FID)."""

import datetime
import os

import torch
import torch.distributed as dist

from promoe.errors import Refusal

TIMEOUT_VARIABLE = "PROMOE_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 30 * 60


def collective_timeout() -> datetime.timedelta:
    """How long a rank waits for the others in one collective: $PROMOE_COLLECTIVE_TIMEOUT seconds, else 30 min."""
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 7 * 24 * 3600:
        raise Refusal(f"{TIMEOUT_VARIABLE}={text!r}: give the seconds a rank waits for the others, a number in "
                      "(0, 604800)")
    return datetime.timedelta(seconds=seconds)


def init_distributed(group_of_one: bool = True) -> tuple[int, int, torch.device]:
    """(rank, world size, device), the device from the local rank (never the global one). Under torchrun the process
    group is made; a single process becomes a group of one, so that one code path serves both, unless
    `group_of_one` is False (the sampling CLI, which needs a group only for its barriers): then it runs without one,
    on the default CUDA device or the CPU."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        if not group_of_one:
            return 0, 1, torch.device("cuda" if cuda else "cpu")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 20000))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=collective_timeout())
    return dist.get_rank(), dist.get_world_size(), device
