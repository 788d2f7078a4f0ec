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


def torchrun(nproc: int = 2) -> tuple[str, ...]:
    """The command prefix of a torchrun launch on a free port (fixed ports collide when tests run side by side)."""
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return (sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}")
