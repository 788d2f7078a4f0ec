"""Files of trained weights, written and read without running code from them, and the one check that a state dict
fits a model (`check_fits`), used by every loader (ours and the official checkpoints' in promoe.convert).

- A safetensors file (a run's EMA export, a converted official checkpoint) holds tensors and string metadata only.
  Its metadata carries the resolved model config (every ModelConfig field) and, for our runs, the whole run config:
  the file alone rebuilds its model, whatever the zoo's tables say today.
- A distributed checkpoint folder (DCP) keeps its index in a pickle (`.metadata`) and non-tensor items (optimizer
  settings) as pickles in its shards; torch reads both with plain unpickling, which runs any code a crafted file
  names. `load_dcp` unpickles the index with an allowlist of the classes DCP writes and the items with
  torch.load(weights_only=True).
"""

import dataclasses
import io
import json
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # as the default planner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from promoe.config import ModelConfig
from promoe.train_config import FORMAT_VERSION, RunConfig, config_from_json, model_config_from_fields

# What DCP pickles into `.metadata` (torch 2.4 .. 2.13): its metadata dataclasses, tensor sizes, dtypes (allowed
# separately: any torch.<dtype>), layouts by name, and the checkpoint's path.
_DCP_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                     "PureWindowsPath")),
}


def save_weights(path: str | Path, state: dict[str, torch.Tensor], model_config: ModelConfig,
                 run_config: RunConfig | None = None, **metadata: str) -> None:
    """A safetensors file of `state` whose metadata rebuilds its model; written to a temporary name first, so a
    killed process never leaves a half file under the final name."""
    path = Path(path)
    metadata = {"format_version": str(FORMAT_VERSION), "model_config": json.dumps(dataclasses.asdict(model_config)),
                **metadata}
    if run_config is not None:
        metadata["run_config"] = run_config.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(tmp), metadata=metadata)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig | None, RunConfig | None]:
    """(tensors, the model config, the run config) of a safetensors file; the configs are None where its metadata
    does not hold them (an export written before configs travelled inside the file)."""
    source = f"{path} (metadata)"
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if metadata.get("format_version", str(FORMAT_VERSION)) != str(FORMAT_VERSION):
        raise ValueError(f"{source}: format_version {metadata['format_version']}; this promoe reads "
                         f"{FORMAT_VERSION} (a newer promoe wrote it?)")
    run_config = config_from_json(metadata["run_config"], source) if "run_config" in metadata else None
    if run_config is not None:
        model_config = run_config.model_config()
    elif "model_config" in metadata or "config" in metadata:  # "config": converted files of before format 2
        fields = json.loads(metadata.get("model_config", metadata.get("config")))
        model_config = model_config_from_fields(fields, source)
    else:
        model_config = None
    return load_file(str(path)), model_config, run_config


def check_fits(given: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model: str) -> None:
    """Raise ValueError naming the first tensor of `expected` (a model's state) that `given` lacks or holds in
    another shape, or a tensor of `given` the model has no place for; `model` says which model, e.g. "ProMoE-S"."""
    for key, value in expected.items():
        if key not in given:
            raise ValueError(f"checkpoint does not fit {model}: missing key {key!r} (shape {list(value.shape)})")
        if given[key].shape != value.shape:
            raise ValueError(f"checkpoint does not fit {model}: key {key!r} has shape {list(given[key].shape)}, the "
                             f"model expects {list(value.shape)}")
    for key in given:
        if key not in expected:
            raise ValueError(f"checkpoint does not fit {model}: unexpected key {key!r}")


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                               torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}: a distributed checkpoint's .metadata holds only "
                                     "DCP's metadata classes, sizes and dtypes")


class SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is unpickled with the allowlist of the classes DCP writes."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as file:
            try:
                metadata = _DCPMetadataUnpickler(file).load()
            except pickle.UnpicklingError as error:
                raise ValueError(f"{path}: {error}; not loaded") from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} holds a {type(metadata).__name__}, not a distributed checkpoint's Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items load with torch.load(weights_only=True) (plain data only)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        item = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
        else:
            self.state_dict[read_item.dest_index.fqn] = item


def read_dcp_metadata(folder: str | Path) -> Metadata:
    return SafeReader(str(folder)).read_metadata()


def load_dcp(state: dict, folder: str | Path) -> None:
    """dcp.load(state, folder) that runs no code from the folder (see the module's docstring)."""
    try:
        dcp.load(state, storage_reader=SafeReader(str(folder)), planner=SafePlanner())
    except CheckpointException as error:  # DCP wraps each rank's exception
        refused = [exc for exc, _ in error.failures.values() if isinstance(exc, pickle.UnpicklingError)]
        if not refused:
            raise
        raise ValueError(f"{folder}: an item is not plain data and was not loaded (unpickling it could run code): "
                         f"{unpickling_refusal(refused[0])}") from None


def unpickling_refusal(error: pickle.UnpicklingError) -> str:
    """The line of torch.load(weights_only=True)'s long message that says what was refused."""
    lines = str(error).splitlines()
    line = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
    return line.split(". Please")[0]  # not torch's advice to allowlist the class


def dcp_shapes(folder: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (e.g. "model.") of a DCP folder, keys without it, as meta tensors of their stored
    shapes."""
    metadata = read_dcp_metadata(folder)
    return {key.removeprefix(prefix): torch.empty(entry.size, device="meta")
            for key, entry in metadata.state_dict_metadata.items() if key.startswith(prefix) and hasattr(entry, "size")}
