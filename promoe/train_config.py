"""The run configuration: one typed dataclass tree, filled from YAML and dotted command-line overrides.

Unknown keys, wrong types and impossible values stop the run before any work, naming the key and the file. A value
is checked against its field's type by `promoe.config.coerce`, the model config's own check. Config files are small
and hand-written: a key given twice (YAML would keep the last silently) and aliases (which can expand a small file
into gigabytes) are refused.
"""

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from promoe.config import FieldError, ModelConfig, coerce
from promoe.data.build import KINDS
from promoe.diffusion import OBJECTIVES
from promoe.errors import NESTED_TOO_DEEPLY, Refusal, one_line, parse_json, quoted, read_small_text
from promoe.zoo import model_config

# config.json 1: the model as zoo name + overrides only (rebuilt from today's zoo); 2: also every ModelConfig field.
FORMAT_VERSION = 2
COMMAND_LINE = "the command line"


@dataclass
class ModelSection:
    name: str = "ProMoE-S"
    overrides: dict = field(default_factory=dict)  # any ModelConfig field, e.g. input_size: 28
    # Set only when read back from a checkpoint's config.json: the model it trained, whatever the zoo says today.
    resolved: ModelConfig | None = None


@dataclass
class DataSection:
    kind: str = "pixels"  # pixels (Fashion-MNIST, else scikit-learn's digits) | latents (cached) | images (folder)
    folder: str | None = None  # pixels: IDX folder, None = Debian's /usr/share/datasets/fashion-mnist
    image_size: int = 256  # images: the centre crop
    vae: str | None = None  # images: encode on the fly with this local AutoencoderKL; also decodes the final grid


@dataclass
class OptimSection:
    lr: float = 1e-4
    warmup_steps: int = 0  # the learning rate rises linearly from lr / warmup_steps to lr over these steps
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.5


@dataclass
class TrainSection:
    objective: str = "rf"  # rf | ddpm
    steps: int = 1000
    global_batch: int = 64
    micro_batch: int | None = None  # per rank; a step accumulates the gradients of global_batch / world / micro_batch
    expert_parallel: int = 1  # ranks that share one MoE layer's routed experts (each holds E / expert_parallel)
    seed: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)) at update n: early weights fade fast
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    out: str = "runs/demo"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16: FSDP2 parameter dtype in compute
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each DiT block (compile time at the first steps, then faster steps)
    grid_steps: int = 100  # sampling steps of the class grid drawn at the end of training; 0: no grid
    grid_cfg_scale: float = 1.5
    fid_samples: int = 0  # Fashion-MNIST runs: the Fashion-MNIST FID of this many samples at the end (grid settings)
    feature_net: str | None = None  # the FID's classifier; None: the end of a run takes promoe.eval's default path


# Numbers with which a run would train nothing, or diverge at once: (key, the test, the rule in words).
NUMBER_RULES = (
    ("optim.lr", lambda lr: 0 < lr < math.inf, "a finite number > 0"),
    ("optim.betas", lambda betas: all(0 <= beta < 1 for beta in betas), "two numbers in [0, 1)"),
    ("optim.weight_decay", lambda decay: 0 <= decay < math.inf, "a finite number >= 0"),
    ("optim.grad_clip", lambda clip: clip > 0, "> 0 (inf: no clipping)"),
    ("optim.warmup_steps", lambda steps: steps >= 0, ">= 0 (0: no warm-up)"),
    ("data.image_size", lambda size: size >= 1, ">= 1"),
    # Generators are seeded by seed * 1_000_003 + step, which must stay below 2**63.
    ("train.seed", lambda seed: 0 <= seed < 2**32, "in 0 .. 2**32 - 1"),
    ("train.ema_decay", lambda decay: 0 <= decay <= 1, "in [0, 1]"),
    ("train.grid_cfg_scale", lambda scale: 1 <= scale < math.inf, "a finite number >= 1 (1: no guidance)"),
)


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    # Dotted keys given on the command line (load_config fills it): their errors say "(on the command line)".
    command_line_keys: typing.ClassVar[frozenset[str]] = frozenset()

    def model_config(self) -> ModelConfig:
        """The model this config builds: the stored one of a checkpoint, else the zoo's entry with the overrides."""
        if self.model.resolved is not None:
            return self.model.resolved
        return model_config(self.model.name, **self.model.overrides).inlined()  # the file it names read once here

    def where(self, key: str, source: str) -> str:
        """Where the value of `key` was set, for error messages."""
        return _where(COMMAND_LINE if key in self.command_line_keys else source)

    def validate(self, world_size: int, source: str) -> None:
        """Impossible settings stop the run, naming the key and where it was set (`source`, or the command line)."""
        train, data = self.train, self.data

        def fail(key: str, message: str):
            raise Refusal(f"{key} {message} {self.where(key, source)}")

        if train.precision not in ("auto", "fp32", "bf16"):
            fail("train.precision", f"must be auto, fp32 or bf16, got {train.precision!r}")
        for key in ("grid_steps", "fid_samples"):
            if getattr(train, key) < 0:
                fail(f"train.{key}", "must be >= 0")
        if train.fid_samples > 0 and data.kind != "pixels":
            fail("train.fid_samples", "needs data.kind=pixels (the Fashion-MNIST FID)")
        if train.fid_samples > 0 and train.grid_steps == 0:
            fail("train.fid_samples", "needs train.grid_steps > 0 (its sampling steps)")
        if train.objective not in OBJECTIVES:
            fail("train.objective", f"must be one of {', '.join(OBJECTIVES)}, got {train.objective!r}")
        if data.kind not in KINDS:
            fail("data.kind", f"must be one of {', '.join(KINDS)}, got {data.kind!r}")
        if data.kind != "pixels" and data.folder is None:
            fail("data.folder", f"is needed for data.kind={data.kind!r}")
        for key in ("steps", "global_batch", "ckpt_every", "log_every", "keep_checkpoints"):
            if getattr(train, key) < 1:
                fail(f"train.{key}", "must be >= 1")
        if train.global_batch % world_size:
            fail("train.global_batch", f"({train.global_batch}) is not divisible by the world size {world_size}")
        per_rank = train.global_batch // world_size
        if train.micro_batch is not None and not (1 <= train.micro_batch <= per_rank
                                                  and per_rank % train.micro_batch == 0):
            fail("train.micro_batch", f"({train.micro_batch}) must divide the per-rank batch {per_rank} (global_batch "
                 f"{train.global_batch} over {world_size} rank(s))")
        if train.expert_parallel < 1 or world_size % train.expert_parallel:
            fail("train.expert_parallel", f"({train.expert_parallel}) must be >= 1 and divide the world size "
                 f"{world_size}")
        for key, holds, rule in NUMBER_RULES:
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if not holds(value):
                fail(key, f"must be {rule}, got {quoted(value)}")
        try:
            self.model_config()
        except FieldError as error:
            raise Refusal(f"model: {error} {self.where(f'model.overrides.{error.field}', source)}") from None
        except ValueError as error:
            raise Refusal(f"model: {error} {self.where('model.name', source)}") from None

    def to_json(self) -> str:
        """Every setting, and the resolved model (every ModelConfig field): a later change of the zoo never changes
        what a checkpoint rebuilds into."""
        values = dataclasses.asdict(self)
        values["model"]["resolved"] = dataclasses.asdict(self.model_config())
        return json.dumps({"format_version": FORMAT_VERSION, **values}, indent=2)


def _where(source: str) -> str:
    return "(on the command line)" if source == COMMAND_LINE else f"(in {source})"


def _fill(section, values: dict, prefix: str, source: str):
    if not isinstance(values, dict):
        raise Refusal(f"{prefix or 'config'}: expected a mapping, got {quoted(values)} {_where(source)}")
    hints = typing.get_type_hints(type(section))
    names = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise Refusal(f"unknown config key {quoted(dotted)} {_where(source)}; known here: {sorted(names)}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, f"{dotted}.", source)
        else:
            try:
                setattr(section, key, coerce(value, hints[key]))
            except ValueError as error:
                raise Refusal(f"{dotted}: {error} {_where(source)}") from None


def config_from_json(text: str, source: str) -> RunConfig:
    """The RunConfig written beside a checkpoint (`RunConfig.to_json`), checked like a YAML file. A version 2 file
    rebuilds its stored model; a version 1 file (no `format_version`) only names it, so it rebuilds from today's zoo."""
    try:
        values = parse_json(text)
    except ValueError as error:
        raise Refusal(f"{source} is not valid JSON ({error}): damaged? Use the config.json of another checkpoint "
                      "of the run") from None
    if not isinstance(values, dict) or not isinstance(values.get("model", {}), dict):
        raise Refusal(f"{source}: expected a run config (a mapping of sections), got {quoted(values)}")
    version = values.pop("format_version", 1)
    if version not in (1, FORMAT_VERSION):
        raise Refusal(f"{source}: format_version {quoted(version)}; this promoe reads 1 and {FORMAT_VERSION} (a "
                      "newer promoe wrote it?)")
    resolved = values.get("model", {}).pop("resolved", None)
    if version == FORMAT_VERSION and not isinstance(resolved, dict):
        raise Refusal(f"{source}: format_version {version} needs model.resolved, every field of the model config")
    config = RunConfig()
    _fill(config, values, "", source)
    if resolved is not None:
        config.model.resolved = model_config_from_fields(resolved, source)
    return config


def model_config_from_fields(values: dict, source: str) -> ModelConfig:
    """A ModelConfig from its stored fields, each checked; a field missing from the file (added to ModelConfig after
    it was written) takes its default, which by convention keeps the behaviour of before the field existed."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise Refusal(f"{source}: model.resolved holds unknown field(s) {quoted(unknown)} (a newer promoe wrote "
                      "it?)")
    if isinstance(values.get("superclasses"), str):  # a stored config carries its values, it names no file
        raise Refusal(f"{source}: model.resolved.superclasses names a file ({quoted(values['superclasses'])}); "
                      "a stored config holds the list itself: not loaded")
    try:
        return ModelConfig(**values)
    except FieldError as error:
        raise Refusal(f"{source}: model.resolved.{error}") from None


def same_model(saved: RunConfig, config: RunConfig) -> str | None:
    """None when `config` builds the model a checkpoint (its config `saved`) holds, else what differs, e.g.
    "depth: the checkpoint has 12, the config asks for 28". The dispatch backend is how, not what, so it may change."""
    was, asked = dataclasses.asdict(saved.model_config()), dataclasses.asdict(config.model_config())
    changed = [f"{key}: the checkpoint has {was[key]!r}, the config asks for {asked[key]!r}"
               for key in was if key != "dispatch" and was[key] != asked[key]]
    return "; ".join(changed) or None


BASE_KEY = "base"  # `base: recipe.yaml` in a config file: that file's settings, under this file's own


def read_config_file(path: Path, including: tuple[Path, ...] = ()) -> dict:
    """The settings of a YAML config file: its own over those of the file its `base` key names (a path relative to
    this file, itself possibly naming a base), merged section by section. Each file's keys and types are checked
    on their own, so an error names the file that holds the key; a file that includes itself is refused."""
    chain = (*including, path.resolve())
    if path.resolve() in including:
        raise Refusal("config files name each other as base in a cycle: " + " -> ".join(map(str, chain)))
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist: check the path (configs/ holds the shipped ones)")
    values = parse_yaml(read_small_text(path, "a run config"), str(path))
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise Refusal(f"config: expected a mapping, got {quoted(values)} (in {path})")
    values = dict(values)
    base = values.pop(BASE_KEY, None)
    _fill(RunConfig(), values, "", str(path))
    if base is None:
        return values
    if not isinstance(base, str):
        raise Refusal(f"{BASE_KEY}: expected the name of a YAML file, got {quoted(base)} (in {path})")
    base_path = path.parent / base
    if not base_path.is_file():
        raise Refusal(f"{BASE_KEY}: {base_path} does not exist (named in {path}, relative to its folder)")
    return _merge(read_config_file(base_path, chain), values)


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in a mapping and any alias (`*name`)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "an alias (*name): configs write each value out",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {quoted(key)} is given twice; keep "
                                                        "one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str):
    """The value of a YAML text (a config file, or an override's value), read by `_ConfigLoader`."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as error:
        where = "a value on the command line" if source == COMMAND_LINE else source
        mark = getattr(error, "problem_mark", None)
        if mark is not None:
            where += f", line {mark.line + 1} column {mark.column + 1}"
        problem = getattr(error, "problem", None) or str(error)
        raise Refusal(f"{where}: {one_line(problem, 300)}") from None
    except RecursionError:
        where = "a value on the command line" if source == COMMAND_LINE else source
        raise Refusal(f"{where}: {NESTED_TOO_DEEPLY}") from None


def _merge(base: dict, values: dict) -> dict:
    """`values` over `base`; where both hold a mapping, key by key, so a file changes one key of a section."""
    merged = dict(base)
    for key, value in values.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_mappings else value
    return merged


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """The defaults, then the YAML file (over its `base` file, if it names one), then `key.sub=value` overrides
    (values parsed as YAML)."""
    config = RunConfig()
    if path is not None:
        _fill(config, read_config_file(Path(path)), "", str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise Refusal(f"override {quoted(item)} is not of the form key.sub=value")
        nested: dict = {}
        cursor = nested
        *parents, leaf = key.split(".")
        for parent in parents:
            cursor = cursor.setdefault(parent, {})
        cursor[leaf] = parse_yaml(raw, COMMAND_LINE)
        if parents[:1] == ["model"] and len(parents) == 2 and parents[1] == "overrides":
            config.model.overrides = {**config.model.overrides, leaf: cursor[leaf]}
            continue
        _fill(config, nested, "", COMMAND_LINE)
    config.command_line_keys = frozenset(item.partition("=")[0] for item in overrides)
    return config
