"""The exponential moving average of the weights, kept beside the shards, and its export as one safetensors file."""

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from promoe.train_config import RunConfig


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


def gather_ema(model: torch.nn.Module, ema: EMA) -> dict[str, torch.Tensor]:
    """The EMA weights as whole tensors on the CPU (a collective: every rank calls it), the live weights kept."""
    live = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ema.params[name].to(p.dtype))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # On one CPU rank the gathered tensors can be the parameters themselves: copy before the live weights return.
    state = {name: value.clone() for name, value in state.items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(live[name])
    return state


def export_ema(model: torch.nn.Module, ema: EMA, config: RunConfig, out: Path, rank: int) -> None:
    """The EMA weights, gathered from the shards, as `ema.safetensors` (written under a temporary name, then
    renamed; the model and run configs in its metadata) with the run's config.json beside it; rank 0 writes them."""
    from promoe.training.checkpoints import disk_full_message
    from promoe.weights import save_weights

    state = gather_ema(model, ema)
    if rank != 0:
        return
    try:  # the configs travel inside the file too: it can be shared alone
        save_weights(out / "ema.safetensors", state, config.model_config(), config)
        (out / "config.json").write_text(config.to_json())
    except OSError as error:
        raise SystemExit(disk_full_message(error, out) or f"writing {out / 'ema.safetensors'}: {error}") from None
