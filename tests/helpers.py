import torch

import promoe

TINY = dict(input_size=8, patch_size=2, hidden_size=32, num_heads=4, depth=2, num_classes=10)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """DiT zero-initialises its adaLN and output layers; tests need every parameter to matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def tiny_model(name: str, seed: int = 0, **overrides):
    return randomize_(promoe.build_model(name, **{**TINY, **overrides}), seed)


def save_tiny_vae(path, sample_size: int = 32):
    """A 1M-parameter AutoencoderKL that downsamples 8x like SD's, random weights (seed 0), saved to `path`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
                        latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=sample_size)
    vae.save_pretrained(path)
    return path


def free_port() -> int:
    """A free port for a process group's rendezvous (fixed ports collide when tests run side by side)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(nproc: int = 2) -> tuple[str, ...]:
    """The command prefix of a torchrun launch on a free port."""
    import sys

    return (sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}")


def in_two_ranks(function, *args) -> dict:
    """`function(rank, port, *args, results)` in 2 processes, which set up their gloo group on `port`; the dict
    `results` they filled."""
    return in_ranks(2, function, *args)


def in_ranks(ranks: int, function, *args) -> dict:
    """`function(rank, port, *args, results)` in `ranks` processes (as `in_two_ranks`)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(function, args=(free_port(), *args, results), nprocs=ranks)
    return dict(results)


def reordered_sums_tolerance(*reduction_lengths: int, magnitude: float, dtype=torch.float32) -> dict:
    """assert_close's tolerance for two computations of the same sums in different orders (other GEMM groupings,
    other ranks, other micro-batches, a kernel against its definition).

    A sum of n terms in floating point is off by at most about n * eps * (the sum of the terms' magnitudes), and
    the order only moves that error around; a chain of dependent sums (a forward GEMM then the backward's two)
    adds its lengths. `magnitude` bounds the terms' sums: the largest |value| of what is compared is the usual
    choice, as the terms of random inputs are of that order. No machine's summation order is assumed."""
    bound = sum(reduction_lengths) * torch.finfo(dtype).eps
    return dict(rtol=bound, atol=bound * magnitude)


def dit_reduction_lengths(config, images: int) -> tuple[int, ...]:
    """The sums that an output of a DiT's training step chains through, for reordered_sums_tolerance: the forward's
    (patch embedding, timestep MLP, per block the adaLN, q/k/v, scores, attention over the tokens, projection, MLP
    up and down and the combine of a token's experts; the final layer's adaLN and linear), the backward's the same
    again, and a weight gradient's sum over the batch's tokens. The loss's own mean is the caller's to add."""
    dim, tokens = config.hidden_size, (config.input_size // config.patch_size) ** 2
    experts = config.expert_spec
    hidden = max(int(dim * config.mlp_ratio), config.expert_hidden)
    block = (dim, dim, dim // config.num_heads, tokens, dim, dim, hidden, experts.activated + experts.shared + 1)
    forward = (config.in_channels * config.patch_size**2, 256, dim, *block * config.depth, dim, dim)
    return (*forward, *forward, images * tokens)


def reordered_steps_tolerance(steps: int, *step_reduction_lengths: int, dtype=torch.float32) -> float:
    """The relative tolerance of a loss or gradient norm of a training run's step `steps` against the same run's,
    each step's sums taken in another order (other ranks, micro-batches, dispatch backends).

    One step's forward and backward leave the gradients off by about (their chained lengths) * eps relative
    (reordered_sums_tolerance); AdamW's update is a ratio of the gradient's moments, so it carries that relative
    error into the parameters' change, and the next step's sums, on parameters already apart, add theirs: the
    errors add up over the steps."""
    return steps * sum(step_reduction_lengths) * torch.finfo(dtype).eps


def distinct_ids(n, e, k, g):
    """[n, k] expert ids, k distinct ones of e per token."""
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).reshape(n, k)


# Plans that the expert kernels' tests sweep: ids [n, k] of e experts (id e: a dropped slot).
KERNEL_ROUTINGS = {
    "random": distinct_ids,
    "empty_experts": lambda n, e, k, g: distinct_ids(n, k, k, g) + 2,
    "one_expert_takes_all": lambda n, e, k, g: torch.full((n, k), e - 1),
    "dropped_slots": lambda n, e, k, g: torch.where(torch.rand(n, k, generator=g) < 0.3, e, distinct_ids(n, e, k, g)),
}
