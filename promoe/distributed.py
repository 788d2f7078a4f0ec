"""The process of a run among its ranks, for training and sampling alike: under torchrun a process group (nccl on
CUDA, else gloo) and this rank's device."""

import os

import torch
import torch.distributed as dist


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
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device
