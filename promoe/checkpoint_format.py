"""Our checkpoint folders: their layout, their manifest, and reading them back. The training driver writes them and
resumes from them (promoe.training.checkpoints); sampling loads a model from one. Nothing here imports training.

    OUT/checkpoints/latest             the name of the newest committed step folder, replaced last
    OUT/checkpoints/step_NNNNNNN/      one saved step, written as `step_NNNNNNN.tmp` and renamed once complete
        .metadata, *.distcp            the torch distributed checkpoint of {"model", "optim", "ema"}
        config.json                    the run's config (`RunConfig.to_json`: every ModelConfig field resolved)
        meta.json                      {"step": N, "data": {"name", "size"}}: the step and the data set trained on
        manifest.json                  written last: {"files": {name: {"bytes", "blake2b"}}} of every other file

A run's exported `ema.safetensors` has the run's `config.json` beside it too. Reading runs no code from a folder:
its index is unpickled with an allowlist and checked against the model before anything is loaded (promoe.weights).
"""

import hashlib
import json
import re
from pathlib import Path

import torch

from promoe.train_config import RunConfig, config_from_json
from promoe.weights import check_fits, dcp_shapes, load_dcp
from promoe.zoo import build_from_config

LATEST = "latest"
CONFIG = "config.json"
META = "meta.json"
MANIFEST = "manifest.json"
STEP_FOLDER = re.compile(r"step_(\d+)")


def step_folder_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(folder: Path) -> int:
    return int(STEP_FOLDER.fullmatch(folder.name).group(1))


def file_digest(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "blake2b").hexdigest()


def check_sizes(folder: Path) -> tuple[dict | None, str | None]:
    """(the manifest's entries, or None for a folder without a manifest; the first file missing or of another size,
    or None). A folder without a manifest was written before digests were recorded."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        return None, None
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"{manifest_path} is unreadable ({error})"
    for name, entry in files.items():  # sizes first: a truncated file is found without reading anything
        path = folder / name
        if not path.exists():
            return files, f"{path} is missing"
        if path.stat().st_size != entry["bytes"]:
            return files, f"{path} holds {path.stat().st_size} bytes, {entry['bytes']} were written (truncated?)"
    return files, None


def read_run_config(path: Path) -> RunConfig:
    """The RunConfig of a `config.json` (a checkpoint folder's, or the one beside an exported `ema.safetensors`)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: it holds the config that rebuilds the trained model")
    return config_from_json(path.read_text(), str(path))


def read_meta(folder: Path) -> dict:
    """The step and the data set of a checkpoint folder (its meta.json)."""
    return json.loads((folder / META).read_text())


def load_training_checkpoint(folder: Path, config: RunConfig, weights: str = "ema") -> torch.nn.Module:
    """A model from one of our checkpoint folders, in one process whatever the number of ranks that saved it: the
    buffers (e.g. DiffMoE's thresholds) from the model state, the parameters from the EMA (or the model). The
    folder's index is checked against the model first."""
    model = build_from_config(config.model_config())
    check_fits(dcp_shapes(folder, "model."), model.state_dict(), f"the model its config describes ({folder})")
    state = {"model": model.state_dict()}
    if weights == "ema":
        state["ema"] = {name: torch.empty_like(p) for name, p in model.named_parameters()}
        check_fits(dcp_shapes(folder, "ema."), state["ema"], f"the model its config describes ({folder}, its EMA)")
    load_dcp(state, folder)
    model.load_state_dict(state["model"])
    if weights == "ema":
        model.load_state_dict(state["ema"], strict=False)
    return model.eval()
