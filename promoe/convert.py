"""Official ProMoE checkpoints <-> promoe models.

The official code keeps one nn.Linear pair per expert (`blocks.N.mlp.experts.{i}.up_proj`, `.down_proj`, the
unconditional expert at index num_routed), the shared expert as `shared_expert.*` and the prototypes as
`cluster_centers`; promoe stacks the experts of a layer into [E, D, H] / [E, H, D] tensors. Every other key is
named alike in both.

    python -m promoe.convert ckpt_step_500000.pth --model ProMoE-XL --out promoe_xl_ema.safetensors
"""

import argparse
import json
import re
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

from promoe.zoo import build_model

_EXPERT_KEY = re.compile(r"(blocks\.\d+\.mlp)\.experts\.(\d+)\.(up_proj|down_proj)\.(weight|bias)")
_EXPERT_PARAM = {("up_proj", "weight"): "w_up_EDH", ("up_proj", "bias"): "b_up_EH",
                 ("down_proj", "weight"): "w_down_EHD", ("down_proj", "bias"): "b_down_ED"}
_RENAMES = ((".mlp.shared_expert.up_proj.", ".mlp.shared.fc1."), (".mlp.shared_expert.down_proj.", ".mlp.shared.fc2."),
            (".mlp.cluster_centers", ".mlp.router.scorer.prototypes"))
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


def official_to_promoe(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and stack an official state dict into promoe's layout (no checks against a model here)."""
    converted: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    for raw_key, value in official.items():
        key = _strip_prefixes(raw_key)
        match = _EXPERT_KEY.fullmatch(key)
        if match:
            layer, index, proj, kind = match.groups()
            # nn.Linear stores [out, in]; the bank stores [in, out] so that x @ w needs no transpose.
            experts[(layer, _EXPERT_PARAM[(proj, kind)])][int(index)] = value.t() if kind == "weight" else value
            continue
        for old, new in _RENAMES:
            key = key.replace(old, new)
        converted[key] = value
    for (layer, name), by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{layer}.experts: expert indices {sorted(by_index)} are not 0..{len(by_index) - 1}")
        converted[f"{layer}.experts.{name}"] = torch.stack([by_index[i] for i in range(len(by_index))])
    return converted


def promoe_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of official_to_promoe: our state dict in the official layout."""
    official = {}
    by_param = {v: k for k, v in _EXPERT_PARAM.items()}
    for key, value in state_dict.items():
        layer, _, name = key.rpartition(".experts.")
        if name in by_param:
            proj, kind = by_param[name]
            for index, one in enumerate(value.unbind(0)):
                official[f"{layer}.experts.{index}.{proj}.{kind}"] = one.t() if kind == "weight" else one
            continue
        for old, new in _RENAMES:
            key = key.replace(new, old)
        official[key] = value
    return official


def check_fits(converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model_name: str) -> None:
    """Raise naming the first missing, unexpected or mis-shaped key."""
    for key, value in expected.items():
        if key not in converted:
            raise KeyError(f"checkpoint does not fit {model_name}: missing key {key!r} (shape {list(value.shape)})")
        if converted[key].shape != value.shape:
            raise ValueError(f"checkpoint does not fit {model_name}: key {key!r} has shape "
                             f"{list(converted[key].shape)}, the model expects {list(value.shape)}")
    for key in converted:
        if key not in expected:
            raise KeyError(f"checkpoint does not fit {model_name}: unexpected key {key!r}")


def load_official_checkpoint(source: str | Path | dict, model_name: str, prefer: str = "ema", **overrides):
    """Our model holding the weights of an official ProMoE checkpoint (a path or an already loaded dict).

    The official stored `pos_embed` is checked against ours (both fixed sin-cos), then dropped.
    """
    checkpoint = torch.load(source, map_location="cpu", weights_only=True) if isinstance(source, (str, Path)) \
        else source
    converted = official_to_promoe(pick_weights(checkpoint, prefer))
    model = build_model(model_name, **overrides)
    stored_pos_embed = converted.pop("pos_embed", None)
    if stored_pos_embed is not None and (stored_pos_embed.shape != model.pos_embed.shape
                                         or not torch.allclose(stored_pos_embed.float(), model.pos_embed, atol=1e-5)):
        raise ValueError(f"checkpoint does not fit {model_name}: key 'pos_embed' of shape "
                         f"{list(stored_pos_embed.shape)} is not the model's fixed sin-cos embedding "
                         f"{list(model.pos_embed.shape)} (wrong input_size or patch_size?)")
    check_fits(converted, model.state_dict(), model_name)
    model.load_state_dict(converted)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an official ProMoE checkpoint to a promoe safetensors file.")
    parser.add_argument("checkpoint", type=Path, help="official ckpt_step_*.pth")
    parser.add_argument("--model", required=True, help="promoe model name, e.g. ProMoE-XL")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights to take")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    model = load_official_checkpoint(args.checkpoint, args.model, prefer=args.weights)
    metadata = {"model": args.model, "config": json.dumps(asdict(model.config)), "weights": args.weights}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(args.out)  # atomic: a crash never leaves a half-written file under the final name
    print(f"wrote {args.out} ({sum(v.numel() for v in state.values()) / 1e6:.2f}M parameters, {args.weights} weights)")


if __name__ == "__main__":
    main()
