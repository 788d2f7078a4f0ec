"""What a number from a user or a file may ask of this machine. Each number that sizes work (sampling steps, image
and patch sizes, the model's widths, an array's header) is bounded here or against the memory this machine has free,
before the work starts, so that a few bytes of a file or one mistyped option end in one line, not in hours of work
or an allocator's traceback. The model's own fields are bounded by promoe.config (`SIZE_LIMITS`)."""

import os

from promoe.errors import Refusal

# Steps of one sampling run (Euler, a diffusers scheduler, respaced DDPM): 40 times the paper's 250.
MAX_SAMPLING_STEPS = 10_000
# One image to evaluate: the Inception resizes every image to 299 x 299, so 4096 x 4096 is far more than enough.
MAX_IMAGE_PIXELS = 4096 * 4096
# The uint8 bytes of one batch of images to evaluate (the Inception takes 4 times as many as floats).
IMAGE_BATCH_BYTES = 256 << 20


def available_memory() -> int:
    """Bytes of memory this machine can give without swapping (MemAvailable; free pages where /proc is absent)."""
    try:
        with open("/proc/meminfo") as file:
            return next(int(line.split()[1]) * 1024 for line in file if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def in_mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def check_sampling_steps(steps: int, what: str = "steps") -> None:
    """Refuse a number of sampling steps outside 1..MAX_SAMPLING_STEPS, before a sampler lays out its schedule."""
    if not 1 <= steps <= MAX_SAMPLING_STEPS:
        raise Refusal(f"{what} {steps}: sampling takes 1..{MAX_SAMPLING_STEPS} steps (the paper samples with 250)")
