"""What a resumed run may change. The config is the truth: learning rate, betas, weight decay, clipping, EMA decay,
steps and the rest apply from the resumed step on, and the changes are listed at resume. What the checkpoint's
weights mean cannot change: the model, the objective that trained it, and the data set (its name and size, from
the checkpoint's meta.json)."""

import dataclasses
from pathlib import Path

from promoe.checkpoint_format import CONFIG, read_meta, read_run_config
from promoe.errors import Refusal
from promoe.train_config import RunConfig, same_model
from promoe.training.ranks import AllRanksStop

# Where a run writes changes, not what it trains.
NOT_SETTINGS = {"train.out"}
REFUSED = "; resume with the same {what}, or start afresh (another --out, or --restart to move this run aside)"


def changed_settings(saved: RunConfig, config: RunConfig) -> list[str]:
    """'key: old -> new' for each setting of the data, optimizer and training sections that differs."""
    changes = []
    for section in ("data", "optim", "train"):
        was, now = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(getattr(config, section))
        changes += [f"{section}.{key}: {was[key]!r} -> {now[key]!r}" for key in now
                    if was.get(key) != now[key] and f"{section}.{key}" not in NOT_SETTINGS]
    return changes


def check_resumable(folder: Path, config: RunConfig, data: dict) -> list[str]:
    """Refuse (SystemExit naming what differs) a checkpoint of another model, objective or data set; else the
    settings that changed since it was written."""
    try:
        saved = read_run_config(folder / CONFIG)
    except (OSError, Refusal) as error:
        raise AllRanksStop(f"cannot resume from {folder}: {error}") from None
    difference = same_model(saved, config)
    if difference is not None:
        raise AllRanksStop(f"checkpoint {folder} was trained with model {saved.model.name} ({difference})"
                         + REFUSED.format(what="model"))
    if saved.train.objective != config.train.objective:
        raise AllRanksStop(f"checkpoint {folder} was trained with the objective {saved.train.objective!r}, the "
                         f"config asks for {config.train.objective!r}" + REFUSED.format(what="objective"))
    meta = read_meta(folder)
    if meta["step"] > config.train.steps:  # the loop would not run, and the export would claim fewer steps
        raise AllRanksStop(f"{folder} has trained {meta['step']} steps, more than train.steps={config.train.steps}: "
                           f"nothing to train; give --max-steps {meta['step']} or more to go on, or another --out")
    trained_on = meta.get("data")
    if trained_on is not None and trained_on != data:  # checkpoints of before it was recorded hold none
        raise AllRanksStop(f"checkpoint {folder} was trained on the data set {trained_on['name']} "
                         f"({trained_on['size']} items), this run would train on {data['name']} ({data['size']} "
                         "items)" + REFUSED.format(what="data (data.kind, data.folder)"))
    return changed_settings(saved, config)
