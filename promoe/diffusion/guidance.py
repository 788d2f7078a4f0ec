"""Classifier-free guidance through conditional routing: the null-label half of the batch runs the
unconditional expert."""

import torch


def guided_prediction(model, x, t, y, scale: float, channels: int, batched: bool = True) -> torch.Tensor:
    """uncond + scale * (cond - uncond) on the first `channels` output channels; the model alone when scale <= 1.

    batched=True runs one batch holding the conditional and the null-label halves; batched=False runs two passes
    (as the official code). Both give the same prediction.
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
