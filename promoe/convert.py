"""Checkpoints of the official ProMoE code (ali-vilab/ProMoE) <-> promoe models.

The official code keeps one linear pair per expert; promoe stacks the experts of a layer into [E, D, H] /
[E, H, D] tensors. Inside `blocks.N.mlp.` each official model names its parts its own way:

| model             | experts                 | scores               | other                                         |
|-------------------|-------------------------|----------------------|-----------------------------------------------|
| ProMoE, ProMoE-EC | experts.{i}.up_proj/... | cluster_centers      | shared_expert.up_proj/down_proj               |
| TC-DiT            | experts.{i}.fc1/fc2     | gate.weight          |                                               |
| EC-DiT            | experts.{i}.fc1/fc2     | gate_weight          |                                               |
| DiffMoE           | experts.{i}.fc1/fc2     | gate_weight          | capacity_predictor.{0,2}, buffers             |
|                   |                         |                      | expert_threshold and ema_decay (0.95)         |

ProMoE's unconditional expert is experts.{num_routed}, as in promoe's bank. Dense-DiT and every key outside the
MoE layers are named alike in both. Two official entries are constants that promoe does not store: the fixed
sin-cos `pos_embed` and DiffMoE's threshold `ema_decay`; they are checked against the model, then dropped.

    python -m promoe.convert ckpt_step_500000.pth --model ProMoE-XL --out promoe_xl_ema.safetensors
"""

import argparse
import pickle
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from promoe.diffusion import OBJECTIVES
from promoe.dit.model import DiT
from promoe.errors import Refusal, exits_with_message, one_line
from promoe.moe.routers import DiffMoERouter
from promoe.weights import check_fits, save_weights, unpickling_refusal
from promoe.zoo import build_model


@dataclass(frozen=True)
class OfficialLayout:
    """The official names of one MoE layer's parts, relative to `blocks.N.mlp.`."""

    up: str  # an expert's first linear map
    down: str  # its second
    renames: tuple[tuple[str, str], ...]  # (official prefix, promoe prefix) of every other learned entry


_PROMOE_LAYOUT = OfficialLayout("up_proj", "down_proj", (
    ("shared_expert.up_proj.", "shared.fc1."),
    ("shared_expert.down_proj.", "shared.fc2."),
    ("cluster_centers", "router.scorer.prototypes"),
))
_GATE_WEIGHT = ("gate_weight", "router.scorer.gate.weight")  # a bare nn.Parameter in EC-DiT and DiffMoE
LAYOUTS = {
    "promoe": _PROMOE_LAYOUT,
    "promoe_ec": _PROMOE_LAYOUT,
    "tc": OfficialLayout("fc1", "fc2", (("gate.weight", "router.scorer.gate.weight"),)),
    "ec": OfficialLayout("fc1", "fc2", (_GATE_WEIGHT,)),
    "diffmoe": OfficialLayout("fc1", "fc2", (
        _GATE_WEIGHT,
        ("capacity_predictor.", "router.capacity_predictor."),
        ("expert_threshold", "router.expert_threshold_E"),
    )),
}
# (up or down, weight or bias) -> the stacked parameter of the ExpertBank.
_BANK_PARAMS = {("up", "weight"): "w_up_EDH", ("up", "bias"): "b_up_EH",
                ("down", "weight"): "w_down_EHD", ("down", "bias"): "b_down_ED"}
_BANK_ENTRIES = {f"experts.{param}": role_kind for role_kind, param in _BANK_PARAMS.items()}
_MLP_KEY = re.compile(r"(?P<layer>blocks\.\d+\.mlp)\.(?P<rest>.+)")
_OFFICIAL_EXPERT = re.compile(r"experts\.(?P<index>\d+)\.(?P<proj>\w+)\.(?P<kind>weight|bias)")
_MOE_PARTS = ("router.", "experts.", "shared.")  # promoe's MoE-layer entries; a dense MLP has fc1 / fc2
_FIXED_HINTS = {"pos_embed": "wrong input_size or patch_size?", "ema_decay": "DiffMoE's threshold EMA decay"}
_PREFIXES = ("module.", "_orig_mod.")


def pick_weights(checkpoint: dict, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint: EMA weights unless prefer="model"."""
    order = ["ema_model_state_dict", "model_state_dict"]
    if prefer == "model":
        order.reverse()
    for key in order:
        if key in checkpoint:
            return checkpoint[key]
    return checkpoint  # already a bare state dict


def _strip_prefixes(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def layout_of(router: str) -> OfficialLayout:
    if router not in LAYOUTS:
        raise Refusal(f"the official code has no model with router {router!r}; it has {sorted(LAYOUTS)} "
                      "and Dense-DiT")
    return LAYOUTS[router]


def _rename(rest: str, renames, key: str) -> str:
    for old, new in renames:
        if rest.startswith(old):
            return new + rest[len(old):]
    raise KeyError(f"no counterpart for key {key!r}")


def official_to_promoe(official: dict[str, torch.Tensor], router: str) -> dict[str, torch.Tensor]:
    """Rename and stack an official state dict of the given router into promoe's layout, dropping the official
    constants (`pos_embed`, `ema_decay`); no check against a model here (load_official_checkpoint does it)."""
    converted: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    for raw_key, value in official.items():
        key = _strip_prefixes(raw_key)
        match = _MLP_KEY.fullmatch(key)
        if key == "pos_embed" or (match and match["rest"] == "ema_decay"):
            continue
        if match is None or router == "dense" or match["rest"].startswith(("fc1.", "fc2.")):
            converted[key] = value  # named alike in both
            continue
        layout = layout_of(router)
        expert = _OFFICIAL_EXPERT.fullmatch(match["rest"])
        if expert and expert["proj"] in (layout.up, layout.down):
            role = "up" if expert["proj"] == layout.up else "down"
            # nn.Linear stores [out, in]; the bank stores [in, out] so that x @ w needs no transpose.
            one = value.t() if expert["kind"] == "weight" else value
            experts[(match["layer"], _BANK_PARAMS[(role, expert["kind"])])][int(expert["index"])] = one
            continue
        converted[f"{match['layer']}.{_rename(match['rest'], layout.renames, key)}"] = value
    for (layer, name), by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise Refusal(f"{layer}.experts: expert indices {sorted(by_index)} are not 0..{len(by_index) - 1}")
        converted[f"{layer}.experts.{name}"] = torch.stack([by_index[i] for i in range(len(by_index))])
    return converted


def promoe_to_official(model: DiT) -> dict[str, torch.Tensor]:
    """The model's state dict in the official layout, constants included: exactly the keys, shapes and values
    that the official code's model of the same config holds."""
    router = model.config.router
    official = {"pos_embed": model.pos_embed}
    for key, value in model.state_dict().items():
        match = _MLP_KEY.fullmatch(key)
        if match is None or not match["rest"].startswith(_MOE_PARTS):
            official[key] = value
            continue
        layout = layout_of(router)
        if match["rest"] in _BANK_ENTRIES:
            role, kind = _BANK_ENTRIES[match["rest"]]
            proj = layout.up if role == "up" else layout.down
            for index, one in enumerate(value.unbind(0)):
                official[f"{match['layer']}.experts.{index}.{proj}.{kind}"] = one.t() if kind == "weight" else one
            continue
        inverse = tuple((new, old) for old, new in layout.renames)
        official[f"{match['layer']}.{_rename(match['rest'], inverse, key)}"] = value
    for index, block in enumerate(model.blocks):
        if block.is_moe and isinstance(block.mlp.router, DiffMoERouter):
            # The official DiffMoE layer keeps its threshold decay as a buffer: a constant in its state dict.
            official[f"blocks.{index}.mlp.ema_decay"] = torch.tensor([block.mlp.router.threshold_decay])
    return official


def check_constants(official: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model_name: str) -> None:
    """The official entries that promoe fixes rather than learns must hold the model's values."""
    for key, value in expected.items():
        name = key.rpartition(".")[2]
        if name in _FIXED_HINTS and not torch.allclose(official[key].float(), value.float(), atol=1e-5):
            raise Refusal(f"checkpoint does not fit {model_name}: key {key!r} does not hold the model's fixed "
                          f"value ({_FIXED_HINTS[name]})")


def load_official_checkpoint(source: str | Path | dict, model_name: str, prefer: str = "ema", **overrides):
    """Our model holding the weights of an official checkpoint (a path or an already loaded dict) of any model
    of the official code: Dense-DiT, TC-DiT, EC-DiT, DiffMoE, ProMoE, ProMoE-EC.

    The checkpoint is checked in the official layout, so a message names the key as the file spells it.
    """
    checkpoint = read_official(Path(source)) if isinstance(source, (str, Path)) else source
    weights = pick_weights(checkpoint, prefer) if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise Refusal(f"{source} holds no state dict (a mapping of names to tensors, alone or under "
                      "'ema_model_state_dict' / 'model_state_dict'): is it an official checkpoint?")
    official = {_strip_prefixes(key): value for key, value in weights.items()}
    model = build_model(model_name, **overrides)
    expected = promoe_to_official(model)
    check_fits(official, expected, model_name)
    check_constants(official, expected, model_name)
    model.load_state_dict(official_to_promoe(official, model.config.router))
    return model


def read_official(path: Path) -> dict:
    """An official .pth, unpickled with torch.load(weights_only=True): tensors, numbers, strings and containers. A
    file holding any other object is refused, naming the object (unpickling it could run code)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file): check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise Refusal(f"{path} holds objects other than tensors and plain data, which are not unpickled (they "
                      f"could run code): {unpickling_refusal(error)}; convert it where you trust it") from None
    except (RuntimeError, EOFError) as error:  # torch's reader on a file that is not a whole checkpoint
        raise Refusal(f"{path} is not a readable torch checkpoint ({type(error).__name__}: "
                      f"{one_line(str(error), 150)}): empty or cut short? Download it again") from None


@exits_with_message
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an official ProMoE-code checkpoint to a promoe "
                                                 "safetensors file; or, with --to diffusers, any checkpoint that "
                                                 "promoe.sample reads to a diffusers pipeline folder (promoe.hf).")
    parser.add_argument("checkpoint", type=Path, help="official ckpt_step_*.pth; with --to diffusers also our "
                        "checkpoint folders and safetensors files")
    parser.add_argument("--model", help="promoe model name of an official .pth, e.g. ProMoE-XL, DiffMoE-L-E8")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file (--to diffusers: a new "
                        "folder)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights to take")
    parser.add_argument("--to", choices=("promoe", "diffusers"), default="promoe",
                        help="promoe: our safetensors file; diffusers: a ProMoEPipeline folder")
    parser.add_argument("--objective", choices=tuple(OBJECTIVES), help="--to diffusers: the objective "
                        "(its scheduler) of an official .pth; our files record theirs")
    parser.add_argument("--vae", help="--to diffusers: the local AutoencoderKL folder of a latent model, saved "
                        "into the pipeline")
    args = parser.parse_args(argv)
    if args.to == "diffusers":
        to_diffusers(args)
        return
    if args.model is None:
        parser.error("--model is required: name the model of the official checkpoint, e.g. ProMoE-XL")
    model = load_official_checkpoint(args.checkpoint, args.model, prefer=args.weights)
    state = model.state_dict()
    # The resolved model config travels in the file's metadata: `promoe.sample --ckpt OUT` rebuilds the model alone.
    save_weights(args.out, state, model.config, model=args.model, weights=args.weights)
    print(f"wrote {args.out} ({sum(v.numel() for v in state.values()) / 1e6:.2f}M parameters, {args.weights} weights)")


def to_diffusers(args) -> None:
    """`--to diffusers`: the checkpoint as a ProMoEPipeline folder; diffusers is imported for this direction only."""
    from promoe.hf import pipeline_from_checkpoint, save_pipeline

    try:
        pipe = pipeline_from_checkpoint(args.checkpoint, args.model, args.weights, args.objective, args.vae)
        save_pipeline(pipe, args.out)
    except (FileNotFoundError, Refusal) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.out}: {type(pipe.scheduler).__name__}, {'a VAE' if pipe.vae is not None else 'no VAE'}")


if __name__ == "__main__":
    main()
