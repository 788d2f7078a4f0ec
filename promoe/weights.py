"""Files of trained weights, written and read without running code from them, and the one check that a state dict
fits a model (`check_fits`), used by every loader (ours and the official checkpoints' in promoe.convert).

- A safetensors file (a run's EMA export, a converted official checkpoint) holds tensors and string metadata only.
  Its metadata carries the resolved model config (every ModelConfig field) and, for our runs, the whole run config:
  the file alone rebuilds its model, whatever the zoo's tables say today. It also records a BLAKE2b digest of its
  tensors, checked when they are read, and names no other file (its values are inline).
- A distributed checkpoint folder (DCP) keeps its index in a pickle (`.metadata`) and non-tensor items (optimizer
  settings) as pickles in its shards; torch reads both with plain unpickling, which runs any code a crafted file
  names. `load_dcp` unpickles the index with an allowlist of the classes DCP writes and the items with
  torch.load(weights_only=True).
"""

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # as the default planner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from promoe.config import ModelConfig
from promoe.errors import Refusal, one_line, parse_json, quoted, written_atomically
from promoe.train_config import FORMAT_VERSION, RunConfig, config_from_json, model_config_from_fields
from promoe.zoo import build_from_config, check_memory

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
# A DCP index is KBs (a few hundred bytes per tensor): a larger `.metadata` is not one.
DCP_METADATA_BYTES = 64 << 20
_BLOCK = re.compile(r"blocks\.(\d+)\.")
TENSORS_DIGEST = "tensors_blake2b"  # the metadata key of a safetensors file's digest of its tensors


def save_weights(path: str | Path, state: dict[str, torch.Tensor], model_config: ModelConfig,
                 run_config: RunConfig | None = None, **metadata: str) -> None:
    """A safetensors file of `state` whose metadata rebuilds its model; written to a temporary name first, so a
    killed process never leaves a half file under the final name."""
    path = Path(path)
    model_config = model_config.inlined()  # a shared file names no other file
    metadata = {"format_version": str(FORMAT_VERSION), "model_config": json.dumps(dataclasses.asdict(model_config)),
                TENSORS_DIGEST: tensors_digest(state), **metadata}
    if run_config is not None:
        metadata["run_config"] = run_config.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(path) as tmp:  # a full disk leaves no partial file behind
        try:
            save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(tmp), metadata=metadata)
        except SafetensorError as error:  # safetensors reports the system's errors (a full disk) as its own
            raise _as_os_error(error, tmp) from None


def _as_os_error(error: SafetensorError, path: Path) -> Exception:
    """The OSError that safetensors' message names ("... (os error 28)"), else the error itself."""
    code = re.search(r"\(os error (\d+)\)", str(error))
    return OSError(int(code[1]), os.strerror(int(code[1])), str(path)) if code else error


def read_weights_header(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig | None, RunConfig | None]:
    """(the tensors of a safetensors file as meta tensors of their stored shapes, the model config, the run config),
    from its header alone: nothing of its tensors is read. The configs are None where its metadata does not hold
    them (an export written before configs travelled inside the file)."""
    source = f"{path} (metadata)"
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            shapes = {name: torch.empty(file.get_slice(name).get_shape(), device="meta") for name in file.keys()}
    except SafetensorError as error:
        raise Refusal(f"{path} is not a readable safetensors file ({one_line(str(error), 120)}): empty or cut "
                      "short? Copy or export it again") from None
    if metadata.get("format_version", str(FORMAT_VERSION)) != str(FORMAT_VERSION):
        raise Refusal(f"{source}: format_version {quoted(metadata['format_version'])}; this promoe reads "
                      f"{FORMAT_VERSION} (a newer promoe wrote it?)")
    run_config = config_from_json(metadata["run_config"], source) if "run_config" in metadata else None
    if run_config is not None:
        model_config = run_config.model_config()
    elif "model_config" in metadata or "config" in metadata:  # "config": converted files of before format 2
        try:
            fields = parse_json(metadata.get("model_config", metadata.get("config")))
        except ValueError as error:
            raise Refusal(f"{source}: model_config is not JSON ({error})") from None
        if not isinstance(fields, dict):
            raise Refusal(f"{source}: model_config is not a mapping of fields, got {quoted(fields)}")
        model_config = model_config_from_fields(fields, source)
    else:
        model_config = None
    return shapes, model_config, run_config


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (its size bounds what they take), checked against the digest its metadata
    recorded when promoe wrote it (a file without one, written before or by others, is read as it is)."""
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as file:
            recorded = (file.metadata() or {}).get(TENSORS_DIGEST)
    except SafetensorError as error:
        raise Refusal(f"{path} is not a readable safetensors file ({one_line(str(error), 120)}): copy or export "
                      "it again") from None
    if recorded is not None and recorded != tensors_digest(state):
        raise Refusal(f"{path} is damaged: its tensors do not match the digest recorded when it was written; copy "
                      "or export it again")
    return state


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """BLAKE2b of every tensor's name, dtype, shape and bytes, in name order (what a safetensors file holds, whatever
    its layout on disk)."""
    digest = hashlib.blake2b()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig | None, RunConfig | None]:
    """(tensors, the model config, the run config) of a safetensors file, as `read_weights_header`."""
    _, model_config, run_config = read_weights_header(path)
    return read_tensors(path), model_config, run_config


def build_to_fit(model_config: ModelConfig, shapes: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """The model of `model_config`, built for real only once the tensors a file holds (`shapes`, meta tensors) fit it
    built on `meta`: what a file's config says costs no memory until the file's own tensors, which its size bounds,
    agree with it. Nor time: the skeleton has at most one block more than the file, which is enough to name the
    first tensor the file lacks."""
    check_shapes_fit(model_config, shapes, source)
    check_memory(model_config, source)  # the buffers no tensor of the file bounds (the position embedding)
    return build_from_config(model_config)


def check_shapes_fit(model_config: ModelConfig, shapes: dict[str, torch.Tensor], source: str, prefix: str = ""
                     ) -> None:
    """`build_to_fit`'s check alone: the file's tensors against the model built on `meta` (a skeleton of at most one
    block more than the file holds), the model's keys under `prefix` in the file."""
    model = f"the model its config describes ({source})"
    blocks = {int(match[1]) for key in shapes if (match := _BLOCK.match(key.removeprefix(prefix)))}
    try:
        skeleton = build_from_config(model_config.replace(depth=min(model_config.depth, len(blocks) + 1)),
                                     device="meta")
    except RuntimeError as error:  # e.g. "Storage size calculation overflowed"
        raise Refusal(f"{source}: its config describes a model that cannot be built ({one_line(str(error), 120)})"
                      ) from None
    check_fits(shapes, {prefix + key: value for key, value in skeleton.state_dict().items()}, model)


def check_fits(given: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model: str) -> None:
    """Raise a Refusal naming the first tensor of `expected` (a model's state) that `given` lacks or holds in
    another shape, or a tensor of `given` the model has no place for; `model` says which model, e.g. "ProMoE-S"."""
    for key, value in expected.items():
        if key not in given:
            raise Refusal(f"checkpoint does not fit {model}: missing key {key!r} (shape {list(value.shape)})")
        if given[key].shape != value.shape:
            raise Refusal(f"checkpoint does not fit {model}: key {key!r} has shape {list(given[key].shape)}, the "
                          f"model expects {list(value.shape)}")
    for key in given:
        if key not in expected:
            raise Refusal(f"checkpoint does not fit {model}: unexpected key {key!r}")


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                               torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}: a distributed checkpoint's .metadata holds only "
                                     "DCP's metadata classes, sizes and dtypes")


class SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is unpickled with the allowlist of the classes DCP writes, and checked to
    read only the folder's own files, within their sizes (a crafted index could name any file, or ask for more
    bytes than the folder holds)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {path.parent} is not a complete checkpoint folder")
        if path.stat().st_size > DCP_METADATA_BYTES:
            raise Refusal(f"{path} holds {path.stat().st_size >> 20} MiB, more than any checkpoint's index: not "
                          "loaded")
        with open(path, "rb") as file:
            try:
                metadata = _DCPMetadataUnpickler(file).load()
            except pickle.UnpicklingError as error:
                raise Refusal(f"{path}: {one_line(str(error), 200)}; not loaded") from None
            except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
                raise Refusal(f"{path} is not a readable checkpoint index ({type(error).__name__}: "
                              f"{one_line(str(error), 120)}): damaged or cut short?") from None
        if not isinstance(metadata, Metadata):
            raise Refusal(f"{path} holds a {type(metadata).__name__}, not a distributed checkpoint's Metadata")
        check_storage(metadata, path.parent)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_storage(metadata: Metadata, folder: Path) -> None:
    """Every item a DCP index names lies within a regular file of `folder`, and its tensors take no more bytes than
    those files hold."""
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = str(info.relative_path)
        if name not in sizes:
            path = folder / name
            if Path(name).name != name or path.is_symlink() or not path.is_file():
                raise Refusal(f"{folder / '.metadata'} names {quoted(name)}, which is not a file of {folder}: "
                              "not loaded")
            sizes[name] = path.stat().st_size
        if not 0 <= info.offset <= info.offset + info.length <= sizes[name]:
            raise Refusal(f"{folder / name} holds {sizes[name]} bytes, its index reads bytes {info.offset} to "
                          f"{info.offset + info.length}: cut short? Not loaded")
    tensor_bytes = sum(entry.size.numel() * entry.properties.dtype.itemsize
                       for entry in metadata.state_dict_metadata.values() if hasattr(entry, "size"))
    if tensor_bytes > sum(sizes.values()):
        raise Refusal(f"{folder / '.metadata'} describes {tensor_bytes} bytes of tensors, its files hold "
                      f"{sum(sizes.values())}: not loaded")


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
    """dcp.load(state, folder) that runs no code from the folder (see the module's docstring); a failure is a
    a Refusal naming the folder."""
    try:
        dcp.load(state, storage_reader=SafeReader(str(folder)), planner=SafePlanner())
    except CheckpointException as error:  # DCP wraps each rank's exception (a BaseException)
        failures = [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]
        refused = [exc for exc in failures if isinstance(exc, pickle.UnpicklingError)]
        if refused:
            raise Refusal(f"{folder}: an item is not plain data and was not loaded (unpickling it could run "
                          f"code): {unpickling_refusal(refused[0])}") from None
        first = failures[0] if failures else error
        if isinstance(first, OSError):
            raise first from None  # a full disk, a missing file: said by the caller as such
        raise Refusal(f"{folder}: reading the checkpoint failed ({type(first).__name__}: "
                      f"{one_line(str(first), 200)}): damaged? Use another checkpoint") from None


def unpickling_refusal(error: pickle.UnpicklingError) -> str:
    """What torch.load(weights_only=True)'s long message says was refused (e.g. "Unsupported global: GLOBAL
    io.open was not an allowed global by default"), without its advice to unpickle the file anyway."""
    lines = [line.strip() for line in str(error).splitlines()]
    line = next((line for line in lines if "WeightsUnpickler error:" in line),
                next((line for line in lines if line), "refused by torch.load(weights_only=True)"))
    return one_line(line.removeprefix("WeightsUnpickler error:").split(". Please")[0].strip(), 300)


def dcp_shapes(folder: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (e.g. "model.") of a DCP folder, keys without it, as meta tensors of their stored
    shapes."""
    metadata = read_dcp_metadata(folder)
    return {key.removeprefix(prefix): torch.empty(entry.size, device="meta")
            for key, entry in metadata.state_dict_metadata.items() if key.startswith(prefix) and hasattr(entry, "size")}
