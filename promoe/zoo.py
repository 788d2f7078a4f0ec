"""The model zoo: every model of the paper by name, built from one ModelConfig."""

import re
from itertools import chain

import torch
import torch.nn as nn

from promoe.config import ModelConfig
from promoe.dit.model import DiT
from promoe.errors import Refusal
from promoe.limits import available_memory, in_mib
from promoe.moe.experts import FFN
from promoe.moe.layer import MoELayer
from promoe.moe.routers import (
    ClassifierRouter,
    DiffMoERouter,
    ExpertChoiceRouter,
    KMeansRouter,
    LinearScorer,
    PrototypeRouter,
    PrototypeScorer,
    TokenChoiceRouter,
)

SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

FAMILIES = {
    "DiT": dict(router="dense"),
    "ProMoE": dict(router="promoe", experts="E14A1S1U1", expert_hidden_ratio=2.0, rcl_weight=1.0),
    "ProMoE-EC": dict(router="promoe_ec", experts="E14A1S1U1", expert_hidden_ratio=2.0, rcl_weight=1.0),
    # DiT-MoE: linear softmax router, full-width experts, load-balance loss.
    "TC-DiT": dict(router="tc", experts="E8A1S0U0", expert_hidden_ratio=4.0, lb_weight=0.01),
    "EC-DiT": dict(router="ec", experts="E8A1S0U0", expert_hidden_ratio=4.0),
    "DiffMoE": dict(router="diffmoe", experts="E8A1S0U0", expert_hidden_ratio=4.0),
}

# The models of the paper's tables; any family and size combination builds.
PAPER_MODELS = (
    *(f"DiT-{s}" for s in SIZES), *(f"ProMoE-{s}" for s in SIZES), "ProMoE-EC-L", "TC-DiT-L-E8", "EC-DiT-L-E8",
    *(f"DiffMoE-{s}-E8" for s in ("B", "L", "XL")), "DiffMoE-L-E16",
)

_NAME = re.compile(r"(?P<family>DiT|ProMoE-EC|ProMoE|TC-DiT|EC-DiT|DiffMoE)-(?P<size>S|B|L|XL)(?:-E(?P<experts>\d+))?")


def model_config(name: str, **overrides) -> ModelConfig:
    """The config of a named model; any field can be overridden by keyword (unknown keys are errors)."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise Refusal(f"unknown model {name!r}; models of the paper: {', '.join(PAPER_MODELS)} "
                      "(any family-size pair works, e.g. 'ProMoE-EC-S')")
    fields = dict(SIZES[match["size"]], **FAMILIES[match["family"]])
    if overrides.get("router", fields["router"]) != fields["router"]:
        # The family's loss weights belong to its router (RCL needs prototypes): another router starts without.
        fields.pop("rcl_weight", None)
        fields.pop("lb_weight", None)
    if match["experts"]:
        if match["family"] in ("DiT", "ProMoE", "ProMoE-EC"):
            raise Refusal(f"model {name!r}: give ProMoE's expert string as experts='E..A..S..U..', not a suffix")
        fields["experts"] = f"E{match['experts']}A1S0U0"
    return ModelConfig().replace(**fields).replace(**overrides)


def build_model(name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                **overrides) -> DiT:
    """Build a model of the zoo, e.g. build_model("ProMoE-S", experts="E14A3S1U1", input_size=16).

    On device="meta" nothing is allocated, so parameter counts of the largest models are instant.
    """
    return build_from_config(model_config(name, **overrides), device, dtype)


def build_from_config(config: ModelConfig, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> DiT:
    """The model of a resolved config, e.g. the one stored with a checkpoint (whatever the zoo's tables say now)."""
    with torch.device(device or "cpu"):
        model = DiT(config, mlp_factory=lambda index: build_mlp(config, index))
    return model.to(dtype) if dtype is not None else model


def model_size(config: ModelConfig) -> tuple[int, int]:
    """(elements, bytes) of the model's parameters and buffers (the position embedding included), from a skeleton
    of at most two blocks on `meta`: blocks alternate between the even blocks' kind and the odd blocks'."""
    skeleton = build_from_config(config.replace(depth=min(config.depth, 2)), device="meta")

    def size(module: nn.Module) -> tuple[int, int]:
        tensors = list(chain(module.parameters(), module.buffers()))
        return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)

    blocks = [size(block) for block in skeleton.blocks]
    whole = size(skeleton)
    per_block = [blocks[index % len(blocks)] for index in range(config.depth)]
    return tuple(whole[i] - sum(block[i] for block in blocks) + sum(block[i] for block in per_block) for i in (0, 1))


def check_memory(config: ModelConfig, source: str) -> None:
    """Refuse, before anything is allocated, a model that does not fit the memory this machine has free."""
    elements, size = model_size(config)
    free = available_memory()
    if size > free:
        raise Refusal(f"{source}: the model takes {in_mib(size)} ({elements} parameters and buffers), this "
                      f"machine has {in_mib(free)} free: is its config right?")


def build_mlp(config: ModelConfig, block_index: int) -> nn.Module:
    """The MLP of one block: MoE in odd blocks when interleaved, else in all; dense for Dense-DiT."""
    dim = config.hidden_size
    if config.router == "dense" or (config.interleave and block_index % 2 == 0):
        return FFN(dim, int(dim * config.mlp_ratio))
    spec = config.expert_spec
    return MoELayer(
        build_router(config),
        num_bank_experts=spec.routed + spec.uncond,
        dim=dim,
        expert_hidden=config.expert_hidden,
        shared_hidden=spec.shared * config.expert_hidden,
        activated_routed=spec.activated,
        null_label=config.num_classes,
        backend=config.dispatch,
    )


def build_router(config: ModelConfig) -> nn.Module:
    spec = config.expert_spec
    dim, routed, conditional = config.hidden_size, spec.routed, spec.uncond == 1
    capacity_factor = config.capacity_factor if config.capacity_factor is not None else spec.activated
    losses = dict(rcl_weight=config.rcl_weight, rcl_temperature=config.rcl_temperature)
    # ProMoE scores by cosine to prototypes, the TC-DiT and EC-DiT baselines by a linear softmax gate.
    if config.router in ("promoe", "promoe_ec"):
        scorer = PrototypeScorer(dim, routed, config.router_scale, config.activation)
    elif config.router in ("tc", "ec"):
        scorer = LinearScorer(dim, routed, init_std=0.006 if config.router == "ec" else None)
    if config.router in ("promoe", "tc"):
        router_class = PrototypeRouter if config.router == "promoe" else TokenChoiceRouter
        return router_class(scorer, routed, spec.activated, conditional, lb_weight=config.lb_weight, **losses)
    if config.router in ("promoe_ec", "ec"):
        return ExpertChoiceRouter(scorer, routed, capacity_factor, conditional, **losses)
    if config.router == "diffmoe":
        if conditional:
            raise Refusal(f"DiffMoE has no unconditional expert: use an expert string with U0, "
                          f"not {config.experts!r}")
        return DiffMoERouter(dim, routed, capacity_factor,
                             predictor_loss_weight=config.capacity_predictor_loss_weight)
    if config.router == "kmeans":
        return KMeansRouter(dim, routed, spec.activated, conditional, config.kmeans_decay,
                            lb_weight=config.lb_weight, **losses)
    superclass_of_class = config.superclass_list()
    if max(superclass_of_class) + 1 != routed:
        raise Refusal(f"classifier routing: {max(superclass_of_class) + 1} superclasses need as many routed "
                      f"experts, the expert string {config.experts!r} has {routed}")
    return ClassifierRouter(dim, superclass_of_class, spec.activated, conditional, config.classifier_loss_weight,
                            lb_weight=config.lb_weight, **losses)


def count_params(model: DiT) -> tuple[int, int]:
    """(activated, total) parameters, as the paper's Table 2 counts them.

    Total counts every parameter plus the fixed position embedding; activated leaves out the experts of the
    bank that one token does not run (the unconditional expert included: a conditional token never runs it).
    """
    total = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    inactive = sum(m.inactive_param_count() for m in model.modules() if isinstance(m, MoELayer))
    return total - inactive, total
