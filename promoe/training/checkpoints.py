"""The files a run writes: its checkpoints, one folder per saved step, written atomically and verified on load, and
at the end the export of its EMA weights. The folders' layout and their reading are promoe.checkpoint_format's.

A save writes a temporary folder (`step_NNNNNNN.tmp`): the torch distributed checkpoint of model, optimizer and
EMA, `config.json` (the run's config, from which sampling rebuilds the model), `meta.json` (the step and the data
set's name and size) and, last, `manifest.json`: the size and BLAKE2b digest of every other file. Then the folder
is renamed to its final name and `latest` is pointed at it. A resume verifies the digests first: a damaged folder
is moved aside (`.damaged`), named with its damaged file, and the newest intact one is used.
"""

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from promoe.checkpoint_format import (
    CONFIG,
    LATEST,
    MANIFEST,
    META,
    STEP_FOLDER,
    changed_file,
    check_sizes,
    file_digest,
    read_meta,
    read_run_config,
    step_folder_name,
    step_of,
)
from promoe.errors import DISK_FULL, Refusal, error_message, write_text_atomically
from promoe.train_config import RunConfig
from promoe.training.ema import EMA
from promoe.training.expert_parallel import expert_banks, local_bank_rows, whole_bank_on_rank_0, with_bank_rows
from promoe.training.ranks import any_rank, full, stop_if_any
from promoe.weights import load_dcp, read_dcp_metadata, save_weights


def describe_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """Size and digest of each of `names`, this rank's share of them (the ranks hash a folder together)."""
    share = names[dist.get_rank()::dist.get_world_size()]
    mine = {name: {"bytes": (folder / name).stat().st_size, "blake2b": file_digest(folder / name)} for name in share}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {name: entry for part in gathered for name, entry in sorted(part.items())}


def disk_full_message(error: BaseException, folder: Path) -> str | None:
    """'the disk holding FOLDER is full' when `error` (or an error it wraps, also a rank's error inside DCP's
    CheckpointException) is ENOSPC or EDQUOT; else None."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL:
            free = shutil.disk_usage(folder).free if folder.exists() else 0
            return (f"the disk holding {folder} is full ({free / 2**20:.1f} MiB free; {current.strerror}): free "
                    "space there, then run the same command again to resume")
        if isinstance(current, CheckpointException):
            pending += [failure[0] if isinstance(failure, tuple) else failure
                        for failure in current.failures.values()]
        pending += [current.__cause__, current.__context__]
    return None


def unreadable(folder: Path) -> str | None:
    """Why a folder cannot be resumed from (its index, config.json or meta.json missing, unreadable or refused), or
    None."""
    try:
        read_dcp_metadata(folder)
        read_run_config(folder / CONFIG)
        read_meta(folder)
    except (OSError, Refusal) as error:
        return error_message(error)
    return None


def first_failure(error: BaseException) -> str:
    """One line for a failed write: a rank's own error inside DCP's CheckpointException (whose text is a
    traceback), else the error."""
    if isinstance(error, CheckpointException) and error.failures:
        failure = next(iter(error.failures.values()))
        error = failure[0] if isinstance(failure, tuple) else failure
    return f"{type(error).__name__}: {error_message(error)}"


class Checkpoints:
    """The checkpoints of a run folder: save, find the newest intact one, load, prune. Every method is called by
    every rank (the saves and the digests are shared); rank 0 alone renames and deletes."""

    def __init__(self, out: Path, keep: int):
        self.root = out / "checkpoints"
        self.keep = keep
        self.rank = dist.get_rank()

    def folders(self) -> list[Path]:
        """The committed step folders, newest first (by step number, not by name)."""
        found = [path for path in self.root.glob("step_*") if STEP_FOLDER.fullmatch(path.name) and path.is_dir()]
        return sorted(found, key=step_of, reverse=True)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        return self.root / pointer.read_text().strip() if pointer.exists() else None

    def save(self, step: int, model, optimizer, ema: EMA, config: RunConfig, data: dict) -> Path:
        """Commit a checkpoint of `step`; a failed write (a full disk named as such) stops the run on every rank
        with `latest` and the older checkpoints untouched."""
        final = self.root / step_folder_name(step)
        tmp = final.with_name(final.name + ".tmp")
        error = None
        if self.rank == 0:
            error = self._try(self._start, tmp, config, {"step": step, "data": data})
        if not any_rank(error is not None):
            model_state, optim_state = get_state_dict(model, optimizer)
            state = with_bank_rows(model, {"model": model_state, "optim": optim_state, "ema": ema.params})
            error = self._try(dcp.save, state, checkpoint_id=str(tmp))
        if not any_rank(error is not None):
            error = self._try(self._commit, tmp, final)
        failure = None if error is None else (disk_full_message(error, self.root)
                                              or f"writing checkpoint {final} failed: {first_failure(error)} "
                                                 f"({shutil.disk_usage(self.root).free / 2**20:.1f} MiB free there)")
        if any_rank(failure is not None) and self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial folder would only take space
        if failure is not None:
            latest = self.latest()
            failure += (f"; {self.root / LATEST} still names {latest.name}, which is intact" if latest else
                        "; no checkpoint of this run was written before")
        stop_if_any(failure)
        return final

    @staticmethod
    def _try(function, *args, **kwargs) -> BaseException | None:
        try:
            function(*args, **kwargs)
        except (OSError, CheckpointException) as error:  # CheckpointException is a BaseException
            return error
        return None

    @staticmethod
    def _start(tmp: Path, config: RunConfig, meta: dict) -> None:
        if tmp.is_symlink():  # planted: removed, never followed
            tmp.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / CONFIG).write_text(config.to_json())  # sampling rebuilds the model from it
        (tmp / META).write_text(json.dumps(meta))

    def _commit(self, tmp: Path, final: Path) -> None:
        """The manifest (digests shared by the ranks), then rank 0 renames, moves `latest` and prunes."""
        names = sorted(path.name for path in tmp.iterdir() if path.is_file())
        manifest = describe_files(tmp, names)
        if self.rank != 0:
            return
        (tmp / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        write_text_atomically(self.root / LATEST, final.name)
        self.prune()

    def prune(self) -> None:
        """Keep the `keep` highest steps and, whatever its step, the checkpoint `latest` names."""
        latest = self.latest()
        for old in self.folders()[self.keep:]:
            if old != latest:
                shutil.rmtree(old)

    def damage(self, folder: Path) -> str | None:
        """What is wrong with a committed folder (a file missing, truncated or changed), or None. A folder whose index,
        config or meta.json cannot be read (or is refused) is damaged too, so that the resume falls back from it; one
        without a manifest (written before digests were recorded) is not verified further."""
        files, problem = check_sizes(folder)
        if problem is None:  # a manifest can be rewritten to match: the index is refused here, not inside DCP's load
            problem = unreadable(folder)
        if any_rank(problem is not None):  # every rank takes the same branch before hashing together
            return problem or f"{folder} is unreadable on another rank"
        if files is None:
            return None
        digests = describe_files(folder, sorted(files))
        return changed_file(folder, files, {name: entry["blake2b"] for name, entry in digests.items()})

    def newest_intact(self) -> Path | None:
        """The newest checkpoint whose files match their digests; each damaged one newer than it is named and
        moved aside to `<name>.damaged` (kept for inspection, no longer a candidate)."""
        for folder in self.folders():
            problem = self.damage(folder)
            if problem is None:
                if not (folder / MANIFEST).exists() and self.rank == 0:
                    print(f"note: {folder} was written before checkpoints recorded digests: not verified")
                return folder
            aside = folder.with_name(folder.name + ".damaged")
            if self.rank == 0:
                print(f"checkpoint {folder} is damaged: {problem}; moved aside to {aside.name}")
                shutil.rmtree(aside, ignore_errors=True)
                folder.rename(aside)
            dist.barrier()
        return None

    def load(self, folder: Path, model, optimizer, ema: EMA) -> dict:
        """Model, optimizer and EMA from `folder` into the sharded objects; its meta.json."""
        model_state, optim_state = get_state_dict(model, optimizer)
        # The optimizer's per-parameter state only: its groups are this run's (one per kind of tensor, which
        # expert parallelism's degree changes; `apply_config` sets their values at every step).
        state = with_bank_rows(model, {"model": model_state, "optim": {"state": optim_state["state"]},
                                       "ema": ema.params})
        load_dcp(state, folder)  # runs no code from the folder, though it is one's own run
        state = local_bank_rows(state)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict={**optim_state, "state": state["optim"]["state"]})
        return read_meta(folder)


def gather_ema(model: torch.nn.Module, ema: EMA) -> dict[str, torch.Tensor]:
    """The EMA weights as whole tensors on the CPU on rank 0, empty on the others (a collective: every rank calls
    it), the live weights kept. One tensor at a time is gathered: FSDP2's shards on every rank (as
    `get_model_state_dict`'s full state dict does), each expert-parallel bank on rank 0 alone."""
    live = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ema.params[name].to(p.dtype))
    banks = expert_banks(model)
    state = {}
    for name, value in model.state_dict().items():  # FSDP2's keys are the model's own
        if name in banks:
            whole = whole_bank_on_rank_0(value.detach(), banks[name][1])
        else:
            whole = full(value.detach())
        if dist.get_rank() == 0:
            # On one CPU rank the gathered tensors can be the parameters themselves: copied before the live
            # weights return.
            state[name] = whole.to("cpu", copy=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(live[name])
    return state


def export_ema(model: torch.nn.Module, ema: EMA, config: RunConfig, out: Path, rank: int) -> None:
    """The EMA weights, gathered from the shards, as `ema.safetensors` (written under a temporary name, then
    renamed; the model and run configs in its metadata) with the run's config.json beside it; rank 0 writes them."""
    state = gather_ema(model, ema)
    if rank != 0:
        return
    try:  # the configs travel inside the file too: it can be shared alone
        save_weights(out / "ema.safetensors", state, config.model_config(), config)
        write_text_atomically(out / CONFIG, config.to_json())
    except OSError as error:
        raise SystemExit(disk_full_message(error, out) or f"writing {out / 'ema.safetensors'}: {error}") from None

