"""The run configuration: one typed dataclass tree, filled from YAML and dotted command-line overrides.

Unknown keys, wrong types and impossible values stop the run before any work, naming the key and the file.
"""

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from promoe.data.build import KINDS
from promoe.diffusion import OBJECTIVES
from promoe.eval.feature_net import DEFAULT_FEATURE_NET
from promoe.zoo import model_config


@dataclass
class ModelSection:
    name: str = "ProMoE-S"
    overrides: dict = field(default_factory=dict)  # any ModelConfig field, e.g. input_size: 28


@dataclass
class DataSection:
    kind: str = "pixels"  # pixels (Fashion-MNIST, else scikit-learn's digits) | latents (cached) | images (folder)
    folder: str | None = None  # pixels: IDX folder, None = Debian's /usr/share/datasets/fashion-mnist
    image_size: int = 256  # images: the centre crop
    vae: str | None = None  # images: encode on the fly with this local AutoencoderKL; also decodes the final grid


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.5


@dataclass
class TrainSection:
    objective: str = "rf"  # rf | ddpm
    steps: int = 1000
    global_batch: int = 64
    seed: int = 0
    ema_decay: float = 0.9999
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    out: str = "runs/demo"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16: FSDP2 parameter dtype in compute
    activation_checkpointing: bool = False  # recompute each block in backward
    grid_steps: int = 100  # sampling steps of the class grid drawn at the end of training; 0: no grid
    grid_cfg_scale: float = 1.5
    fid_samples: int = 0  # Fashion-MNIST runs: the Fashion-MNIST FID of this many samples at the end (grid settings)
    feature_net: str = str(DEFAULT_FEATURE_NET)  # python -m promoe.eval.train_feature_net writes it


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self, world_size: int, source: str) -> None:
        where = f"(in {source})"
        if self.train.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision must be auto, fp32 or bf16, got {self.train.precision!r} {where}")
        if self.train.grid_steps < 0 or self.train.fid_samples < 0:
            raise ValueError(f"train.grid_steps and train.fid_samples must be >= 0 {where}")
        if self.train.fid_samples > 0 and self.data.kind != "pixels":
            raise ValueError(f"train.fid_samples: the Fashion-MNIST FID needs data.kind=pixels {where}")
        if self.train.fid_samples > 0 and self.train.grid_steps == 0:
            raise ValueError(f"train.fid_samples needs train.grid_steps > 0 (its sampling steps) {where}")
        if self.train.objective not in OBJECTIVES:
            raise ValueError(f"train.objective must be one of {', '.join(OBJECTIVES)}, got {self.train.objective!r} "
                             f"{where}")
        if self.data.kind not in KINDS:
            raise ValueError(f"data.kind must be one of {', '.join(KINDS)}, got {self.data.kind!r} {where}")
        if self.data.kind != "pixels" and self.data.folder is None:
            raise ValueError(f"data.folder is needed for data.kind={self.data.kind!r} {where}")
        for key in ("steps", "global_batch", "ckpt_every", "log_every", "keep_checkpoints"):
            if getattr(self.train, key) < 1:
                raise ValueError(f"train.{key} must be >= 1 {where}")
        if self.train.global_batch % world_size:
            raise ValueError(f"train.global_batch={self.train.global_batch} is not divisible by the world size "
                             f"{world_size} {where}")
        try:
            model_config(self.model.name, **self.model.overrides)
        except ValueError as error:
            raise ValueError(f"model: {error} {where}") from error

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _coerce(value, annotation, key: str, source: str):
    """value checked against the field's type; ints are accepted for floats, lists for tuples, and strings such
    as '1e-3' for floats (YAML 1.1 reads 1e-3 without a dot as a string)."""
    origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(annotation)):
            raise ValueError(f"{key}: expected a list of {len(typing.get_args(annotation))} numbers, got {value!r} "
                             f"(in {source})")
        return tuple(_coerce(v, t, key, source) for v, t in zip(value, typing.get_args(annotation)))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            if option is not type(None):
                try:
                    return _coerce(value, option, key, source)
                except ValueError:
                    pass
        raise ValueError(f"{key}: {value!r} is not a {annotation} (in {source})")
    expected = origin or annotation
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {getattr(expected, '__name__', expected)}, got {value!r} (in {source})")
    return value


def _fill(section, values: dict, prefix: str, source: str):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {values!r} (in {source})")
    hints = typing.get_type_hints(type(section))
    names = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown config key {dotted!r} (in {source}); known here: {sorted(names)}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, f"{dotted}.", source)
        else:
            setattr(section, key, _coerce(value, hints[key], dotted, source))


def config_from_json(text: str, source: str) -> RunConfig:
    """The RunConfig written beside a checkpoint (`RunConfig.to_json`), checked like a YAML file."""
    config = RunConfig()
    _fill(config, json.loads(text), "", source)
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """The defaults, then the YAML file, then `key.sub=value` overrides (values parsed as YAML)."""
    config = RunConfig()
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        _fill(config, values, "", str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        nested: dict = {}
        cursor = nested
        *parents, leaf = key.split(".")
        for parent in parents:
            cursor = cursor.setdefault(parent, {})
        cursor[leaf] = yaml.safe_load(raw)
        if parents[:1] == ["model"] and len(parents) == 2 and parents[1] == "overrides":
            config.model.overrides = {**config.model.overrides, leaf: cursor[leaf]}
            continue
        _fill(config, nested, "", "the command line")
    return config
