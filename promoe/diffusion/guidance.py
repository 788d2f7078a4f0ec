"""Classifier-free guidance through conditional routing: the null-label half of the batch runs the
unconditional expert."""

import torch

from promoe.errors import Refusal

# auto: two passes for a model whose routing couples the samples of a batch (DiffMoE), one batch for the others.
GUIDANCE_MODES = ("auto", "batched", "two-pass")


def batches_guidance(model, mode: str) -> bool:
    """Whether guidance runs the conditional and the null halves in one batch (see GUIDANCE_MODES).

    In one batch the halves compete for the experts of a model whose routing couples the samples of a batch, and
    guidance becomes another function than the two passes that define it (and that the official code runs)."""
    if mode not in GUIDANCE_MODES:
        raise Refusal(f"unknown guidance mode {mode!r}: choose one of {', '.join(GUIDANCE_MODES)}")
    if mode == "auto":
        return not model.routing_couples_samples
    return mode == "batched"


def guided_prediction(model, x, t, y, scale: float, channels: int, batched: bool = True) -> torch.Tensor:
    """uncond + scale * (cond - uncond) on the first `channels` output channels; the model alone when scale <= 1.
    The other channels (a learned variance) are the conditional prediction's.

    batched=True runs one batch holding the conditional and the null-label halves; batched=False runs two passes
    (as the official code). Both give the same prediction unless the model's routing couples samples.
    """
    if scale <= 1:
        return model(x, t, y)
    null = torch.full_like(y, model.num_classes)
    if batched:
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    else:
        cond, uncond = model(x, t, y), model(x, t, null)
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)
