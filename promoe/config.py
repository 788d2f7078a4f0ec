"""The model configuration: one typed dataclass, validated on construction, the source of truth for a model; and
`coerce`, the type check of a config value that the run config (promoe.train_config) uses too."""

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass

from promoe.errors import Refusal, error_message, parse_json, quoted, read_small_text

ROUTERS = ("dense", "promoe", "promoe_ec", "tc", "ec", "diffmoe", "classifier", "kmeans")
BACKENDS = ("loop", "torch", "triton", "grouped_gemm")  # the dispatch backends of promoe.moe.dispatch
ACTIVATIONS = ("identity", "sigmoid", "softmax")  # ProMoE's router activations (promoe.moe.routing)


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise Refusal(f"unknown dispatch backend {name!r}; choose one of {BACKENDS}")


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise Refusal(f"unknown router activation {name!r}; choose one of {sorted(ACTIVATIONS)}")

# The most a model's fields may ask for: far beyond every model of the paper (DiT-XL: hidden 1152, depth 28, 256
# tokens, 1000 classes, 16 experts), so that a file or a mistyped override cannot ask for terabytes. Whether a model
# within them fits this machine's memory is checked where it is built (promoe.zoo.check_memory).
SIZE_LIMITS = {"input_size": 4096, "hidden_size": 16384, "depth": 1024, "num_classes": 1 << 20,
               "in_channels": 1024, "mlp_ratio": 64, "expert_hidden_ratio": 64}
MAX_TOKENS = 16384  # (input_size / patch_size) ** 2: a 128 x 128 grid of patches
MAX_EXPERTS = 1024
_EXPERT_STRING = re.compile(r"E(\d+)A(\d+)S(\d+)U(\d+)")


@dataclass(frozen=True)
class ExpertSpec:
    """The paper's expert string: E14A1S1U1 = 14 experts in all, 1 activated among the routed ones (top-1),
    1 shared, 1 unconditional; the routed experts are the rest (12)."""

    total: int
    activated: int
    shared: int
    uncond: int

    @property
    def routed(self) -> int:
        return self.total - self.shared - self.uncond

    @classmethod
    def parse(cls, text: str) -> "ExpertSpec":
        match = _EXPERT_STRING.fullmatch(text)
        if match is None:
            raise Refusal(f"bad expert string {text!r}: expected the form E<total>A<activated>S<shared>U<uncond>, "
                          "e.g. 'E14A1S1U1'")
        spec = cls(*map(int, match.groups()))
        if spec.total > MAX_EXPERTS:
            raise Refusal(f"expert string {text!r}: at most {MAX_EXPERTS} experts are supported")
        if spec.routed < 1:
            raise Refusal(f"expert string {text!r} leaves {spec.routed} routed experts (E - S - U must be >= 1)")
        if not 1 <= spec.activated <= spec.routed:
            raise Refusal(f"expert string {text!r}: A={spec.activated} must lie in 1..{spec.routed} (routed)")
        if spec.uncond > 1:
            raise Refusal(f"expert string {text!r}: at most one unconditional expert (U0 or U1) is supported, "
                          "as in the official implementation")
        return spec


class FieldError(Refusal):
    """An impossible value of one ModelConfig field; `field` names it, so callers can say where it was set."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def coerce(value, annotation):
    """`value` checked against a field's type annotation, and the value to store: ints are accepted for floats,
    lists for tuples, and strings such as '1e-3' for floats (YAML 1.1 reads 1e-3 without a dot as a string).
    A value of another type is a ValueError that says what was expected; the caller names the field."""
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
            raise Refusal(f"expected a list of {len(typing.get_args(annotation))} numbers, got {quoted(value)}")
        return tuple(coerce(v, t) for v, t in zip(value, typing.get_args(annotation)))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            if option is not type(None):
                try:
                    return coerce(value, option)
                except ValueError:
                    pass
        raise Refusal(f"{quoted(value)} is not a {annotation}")
    expected = origin or annotation
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise Refusal(f"expected {getattr(expected, '__name__', expected)}, got {quoted(value)}")
    return value


def check_superclasses(mapping, num_classes: int, source: str) -> None:
    if not isinstance(mapping, list) or len(mapping) != num_classes or \
            any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in mapping):
        length = len(mapping) if isinstance(mapping, list) else "no"
        raise FieldError("superclasses", f"must map each of the {num_classes} classes to an integer >= 0; got "
                                         f"{length} entries from {source}")


@dataclass
class ModelConfig:
    # DiT backbone
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    qk_norm: bool = False
    # MoE layers (router "dense" = Dense-DiT)
    router: str = "dense"
    experts: str = "E14A1S1U1"
    expert_hidden_ratio: float = 2.0  # expert width / hidden size
    interleave: bool = True  # MoE in odd blocks, dense MLP in even blocks; False = MoE in every block
    activation: str = "identity"  # prototypical routing: identity | sigmoid | softmax
    router_scale: float = 1.0  # alpha in alpha * cos(x, p)
    rcl_weight: float = 0.0
    rcl_temperature: float = 0.07
    lb_weight: float = 0.0
    capacity_factor: float | None = None  # expert choice: None = the A of the expert string
    # DiffMoE: weight of the capacity predictor's BCE. 1.0 is what DiffMoE's own release reads; the ProMoE code
    # behind the paper's DiffMoE numbers uses its DiT constructor's default 0.01 (the configs/diffmoe_*.yaml).
    capacity_predictor_loss_weight: float = 1.0
    superclasses: list[int] | str | None = None  # classifier routing: class -> superclass list, or a file
    classifier_loss_weight: float = 1.0  # classifier routing: weight of its cross-entropy
    kmeans_decay: float = 0.0  # k-means routing: 0 replaces a centroid by its tokens' mean, as the paper
    dispatch: str | None = None  # one of BACKENDS; None = the default of the device the model is placed on

    def __post_init__(self):
        self.check_types()
        self.check_ranges()
        if self.router not in ROUTERS:
            raise FieldError("router", f"unknown router {self.router!r}; choose one of {ROUTERS}")
        if self.input_size % self.patch_size:
            raise FieldError("patch_size", f"input_size={self.input_size} is not a multiple of patch_size="
                                           f"{self.patch_size}")
        tokens = (self.input_size // self.patch_size) ** 2
        if tokens > MAX_TOKENS:
            raise FieldError("input_size", f"{self.input_size} / patch_size {self.patch_size} makes {tokens} tokens, "
                                           f"more than {MAX_TOKENS}")
        if self.hidden_size % self.num_heads:
            raise FieldError("num_heads", f"hidden_size={self.hidden_size} is not divisible by num_heads="
                                          f"{self.num_heads}")
        try:
            check_activation(self.activation)
        except ValueError as error:
            raise FieldError("activation", str(error)) from None
        if self.dispatch is not None:
            try:
                check_backend(self.dispatch)
            except ValueError as error:
                raise FieldError("dispatch", str(error)) from None
        if self.router != "dense":
            try:
                ExpertSpec.parse(self.experts)
            except ValueError as error:
                raise FieldError("experts", str(error)) from None
        if self.router == "classifier" and self.superclasses is None:
            raise FieldError("superclasses", "router 'classifier' needs a list mapping each class to its superclass, "
                                             "or the path of a file holding one")
        if isinstance(self.superclasses, list):
            check_superclasses(self.superclasses, self.num_classes, "the config")

    def superclass_list(self) -> list[int]:
        """The class -> superclass map, read from its file where the field names one (a JSON list, or one integer
        per line)."""
        if not isinstance(self.superclasses, str):
            return self.superclasses
        try:
            text = read_small_text(self.superclasses, "a class -> superclass list")
        except (OSError, ValueError) as error:
            raise FieldError("superclasses", error_message(error)) from None
        try:
            mapping = parse_json(text) if text.lstrip().startswith("[") else [int(v) for v in text.split()]
        except ValueError as error:
            raise FieldError("superclasses", f"{self.superclasses} holds no list of integers ({error})") from None
        check_superclasses(mapping, self.num_classes, self.superclasses)
        return mapping

    def inlined(self) -> "ModelConfig":
        """This config with every value inline (the superclass list read from its file): what files we share carry,
        so that none of them names a file on the machine that wrote it."""
        if not isinstance(self.superclasses, str):
            return self
        return dataclasses.replace(self, superclasses=self.superclass_list())

    def check_types(self) -> None:
        """Every field of its type (`coerce`: ints become floats where the field is a float), floats finite."""
        for field in dataclasses.fields(self):
            try:
                value = coerce(getattr(self, field.name), field.type)
            except ValueError as error:
                raise FieldError(field.name, str(error)) from None
            setattr(self, field.name, value)
            if isinstance(value, float) and not math.isfinite(value):
                raise FieldError(field.name, f"must be a finite number, got {value!r}")

    def check_ranges(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        for name, most in SIZE_LIMITS.items():
            if getattr(self, name) > most:
                raise FieldError(name, f"must be at most {most}, got {getattr(self, name)}")
        for name in ("mlp_ratio", "expert_hidden_ratio", "router_scale", "rcl_temperature"):
            if getattr(self, name) <= 0:
                raise FieldError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("rcl_weight", "lb_weight", "classifier_loss_weight", "capacity_predictor_loss_weight"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0, got {getattr(self, name)}")
        # p = 1 would drop every label: the model would never see a class and guidance would have nothing to scale.
        if not 0 <= self.class_dropout_prob < 1:
            raise FieldError("class_dropout_prob", f"must lie in [0, 1), got {self.class_dropout_prob}")
        if not 0 <= self.kmeans_decay < 1:
            raise FieldError("kmeans_decay", f"must lie in [0, 1), got {self.kmeans_decay}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise FieldError("capacity_factor", f"must be > 0 (or None: the A of the expert string), got "
                                                f"{self.capacity_factor}")

    @property
    def expert_spec(self) -> ExpertSpec:
        return ExpertSpec.parse(self.experts)

    @property
    def expert_hidden(self) -> int:
        return int(self.hidden_size * self.expert_hidden_ratio)

    def replace(self, **overrides) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise Refusal(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        return dataclasses.replace(self, **overrides)
