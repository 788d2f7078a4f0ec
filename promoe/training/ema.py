"""The exponential moving average of the weights, kept beside the shards; `checkpoints` exports it."""

import torch


class EMA:
    """fp32 exponential moving average of each rank's local parameter shards. With `warmup`, update n uses the
    decay min(decay, (1 + n) / (10 + n)), so that a short run's average is not dominated by its first weights."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.params = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        weight = 1 - self.decay_at(step)
        for name, p in model.named_parameters():
            self.params[name].lerp_(p.detach().float(), weight)
