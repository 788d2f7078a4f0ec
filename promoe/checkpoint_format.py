"""Our checkpoint folders: their layout, their manifest, and reading them back. The training driver writes them and
resumes from them (promoe.training.checkpoints); sampling loads a model from one. Nothing here imports training.

    OUT/checkpoints/latest             the name of the newest committed step folder, replaced last
    OUT/checkpoints/step_NNNNNNN/      one saved step, written as `step_NNNNNNN.tmp` and renamed once complete
        .metadata, *.distcp            the torch distributed checkpoint of {"model", "optim", "ema"}
        config.json                    the run's config (`RunConfig.to_json`: every ModelConfig field resolved)
        meta.json                      {"step": N, "data": {"name", "size"}}: the step and the data set trained on
        manifest.json                  written last: {"files": {name: {"bytes", "blake2b"}}} of every other file

A run's exported `ema.safetensors` has the run's `config.json` beside it too. Every reader of a folder (resume,
sampling, routing maps, conversion) verifies it against its manifest first; a folder without one is named as not
verified. Reading runs no code from a folder: its index is unpickled with an allowlist and checked against the
model, built on `meta`, before anything is allocated or loaded (promoe.weights).
"""

import hashlib
import re
import sys
from pathlib import Path

import torch

from promoe.errors import Refusal, error_message, one_line, parse_json, quoted, read_small_text
from promoe.train_config import RunConfig, config_from_json
from promoe.weights import build_to_fit, check_fits, dcp_shapes, load_dcp

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


def read_manifest(folder: Path) -> dict[str, dict] | None:
    """{name: {"bytes", "blake2b"}} of a folder's manifest, None for a folder without one. Every name is a regular
    file of the folder itself (no path, no link): a manifest cannot make us read anything else."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        files = parse_json(read_small_text(path, "a checkpoint's manifest"))["files"]
        for name, entry in files.items():
            if Path(name).name != name or name in (".", "..") or not isinstance(entry["bytes"], int) \
                    or not isinstance(entry["blake2b"], str):
                raise Refusal(f"the entry {quoted(name)} is not a file of the folder with its size and digest")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise Refusal(f"{path} is unreadable ({one_line(str(error), 200)})") from None
    return files


def check_sizes(folder: Path) -> tuple[dict | None, str | None]:
    """(the manifest's entries, or None for a folder without a manifest; the first file missing or of another size,
    or None). A folder without a manifest was written before digests were recorded, or not by us."""
    try:
        files = read_manifest(folder)
    except (OSError, ValueError) as error:
        return None, error_message(error)
    for name, entry in (files or {}).items():  # sizes first: a truncated file is found without reading anything
        path = folder / name
        if not path.exists():
            return files, f"{path} is missing"
        if path.is_symlink() or not path.is_file():
            return files, f"{path} is not a regular file"
        if path.stat().st_size != entry["bytes"]:
            return files, f"{path} holds {path.stat().st_size} bytes, {entry['bytes']} were written (truncated?)"
    return files, None


def changed_file(folder: Path, files: dict[str, dict], digests: dict[str, str]) -> str | None:
    """The first file whose digest (`digests`, name -> BLAKE2b) is not the one its manifest (`files`) recorded."""
    changed = [name for name in files if digests[name] != files[name]["blake2b"]]
    return f"{folder / changed[0]} does not match the digest recorded when it was written" if changed else None


def verify_checkpoint(folder: Path) -> bool:
    """Check one of our checkpoint folders against its manifest, as a resume does: a Refusal naming the first file
    missing, truncated or changed; True when verified, False for a folder without a manifest (not verified)."""
    files, problem = check_sizes(folder)
    if problem is None and files is not None:
        problem = changed_file(folder, files, {name: file_digest(folder / name) for name in files})
    if problem is not None:
        raise Refusal(f"checkpoint {folder} is damaged: {problem}; use another checkpoint of the run (the "
                      "resume of a run moves a damaged one aside and uses the newest intact one)")
    return files is not None


def check_step_folder(folder: Path) -> None:
    """Refuse, saying what to give instead, a folder that is not one saved step: a run folder, its `checkpoints`
    folder, or any other folder."""
    if (folder / "checkpoints").is_dir() or (folder / LATEST).is_file() or \
            any(STEP_FOLDER.fullmatch(path.name) for path in folder.glob("step_*")):
        root = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
        latest = root / LATEST
        named = (root / latest.read_text().strip()[:100]) if latest.is_file() else root / "step_NNNNNNN"
        exported = f", or {root.parent / 'ema.safetensors'}" if (root.parent / "ema.safetensors").is_file() else ""
        raise Refusal(f"{folder} holds a run's checkpoints, not one saved step: give one of its step folders, "
                      f"e.g. {named}{exported}")
    if not (folder / ".metadata").is_file() and not (folder / MANIFEST).is_file():
        raise Refusal(f"{folder} is not a checkpoint folder (no .metadata, no {MANIFEST}): give a step folder "
                      "(runs/NAME/checkpoints/step_NNNNNNN), an ema.safetensors or an official .pth")


def read_run_config(path: Path) -> RunConfig:
    """The RunConfig of a `config.json` (a checkpoint folder's, or the one beside an exported `ema.safetensors`)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: it holds the config that rebuilds the trained model")
    return config_from_json(read_small_text(path, "a run's config"), str(path))


def read_meta(folder: Path) -> dict:
    """The step and the data set of a checkpoint folder (its meta.json)."""
    path = folder / META
    try:
        meta = parse_json(read_small_text(path, "a checkpoint's step and data set"))
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            raise Refusal("it holds no step number")
    except ValueError as error:
        raise Refusal(f"{path} is unreadable ({one_line(str(error), 200)})") from None
    return meta


def read_checkpoint(folder: Path, weights: str = "ema") -> tuple[torch.nn.Module, RunConfig]:
    """(model, its RunConfig) from one of our step folders, verified against its manifest first; a folder without
    one is read with a note that it was not verified."""
    check_step_folder(folder)
    if not verify_checkpoint(folder):
        print(f"note: {folder} has no {MANIFEST} (written before checkpoints recorded digests, or not by promoe): "
              "its files are not verified", file=sys.stderr)
    config = read_run_config(folder / CONFIG)
    return load_training_checkpoint(folder, config, weights), config


def load_training_checkpoint(folder: Path, config: RunConfig, weights: str = "ema") -> torch.nn.Module:
    """A model from one of our checkpoint folders, in one process whatever the number of ranks that saved it: the
    buffers (e.g. DiffMoE's thresholds) from the model state, the parameters from the EMA (or the model). The
    folder's index is checked against the model, built on `meta`, before anything is allocated."""
    model = build_to_fit(config.model_config(), dcp_shapes(folder, "model."), str(folder))
    state = {"model": model.state_dict()}
    if weights == "ema":
        state["ema"] = {name: torch.empty_like(p) for name, p in model.named_parameters()}
        check_fits(dcp_shapes(folder, "ema."), state["ema"], f"the model its config describes ({folder}, its EMA)")
    load_dcp(state, folder)
    model.load_state_dict(state["model"])
    if weights == "ema":
        model.load_state_dict(state["ema"], strict=False)
    return model.eval()
