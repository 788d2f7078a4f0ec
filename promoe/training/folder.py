"""The run folder (`--out`): one run at a time holds it, a fresh start never mixes with or destroys another run,
and what killed writes leave behind is removed.

Rank 0 holds an exclusive `fcntl.flock` on `<out>/run.lock` for the run's lifetime (the kernel drops it when the
process ends, however it ends); the file names the holder's host and pid, so a second run can say whose it is.
"""

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

import torch.distributed as dist

from promoe.errors import error_message, not_following_links, temporaries_of
from promoe.training.ranks import stop_if_any

LOCK = "run.lock"
# What a run writes into its folder; a fresh start with --restart moves these aside.
RUN_FILES = ("checkpoints", "metrics.csv", "tensorboard", "ema.safetensors", "config.json", "loss.png",
             "expert_load.png", "samples.png", "fid.json")
OLD_RUN_PREFIX = "old-"


def lock_folder(out: Path):
    """Take the run folder's lock (rank 0) and return the open lock file, which holds it until the process ends.
    A folder locked by another run stops every rank, naming the holder."""
    held, refusal = None, None
    if dist.get_rank() == 0:
        held, refusal = _take_lock(out)
    stop_if_any(refusal)
    return held


def _take_lock(out: Path):
    """(the open lock file, None), or (None, why the folder cannot be held)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        file = open(out / LOCK, "a+", opener=not_following_links)
    except OSError as error:  # --out a file, a dangling link, a read-only folder
        return None, f"error: cannot use {out} as the run folder: {error_message(error)}"
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "a process that has not written its name yet"
        file.close()
        return None, f"{out} is in use by another run ({holder}): wait for it to end, or give another --out"
    except OSError as error:  # a file system without locks
        file.close()
        return None, f"cannot lock {out / LOCK} ({error}): give an --out on a file system that supports flock"
    try:
        file.seek(0)
        file.truncate()
        file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
    except OSError as error:  # a full disk
        file.close()
        return None, f"error: cannot write {out / LOCK}: {error_message(error)}"
    return file, None


def remove_leftovers(out: Path) -> None:
    """Temporary files and folders of writes that a kill interrupted (their final names were never touched)."""
    leftovers = [*(out / "checkpoints").glob("*.tmp"), *(out / "checkpoints").glob(".*.tmp"),
                 *(path for name in RUN_FILES for path in temporaries_of(out / name))]
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
        else:
            continue
        print(f"removed {path}, left by a write that was killed")


def previous_run(out: Path) -> list[str]:
    """What of another run the folder holds that a fresh start would destroy: its checkpoints, its EMA export."""
    held = [path.name for path in sorted((out / "checkpoints").glob("step_*"))]
    return held + [name for name in ("ema.safetensors",) if (out / name).exists()]


def move_aside(out: Path) -> Path:
    """Move the run files of `out` into `out/old-<time>/` (for --restart); the folder, returned, keeps them."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, count = out / f"{OLD_RUN_PREFIX}{stamp}", 1
    while aside.exists():  # two restarts within a second
        count += 1
        aside = out / f"{OLD_RUN_PREFIX}{stamp}-{count}"
    aside.mkdir()
    for name in RUN_FILES:
        if (out / name).exists():
            (out / name).rename(aside / name)
    return aside
