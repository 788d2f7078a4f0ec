"""Inception features of an image set and reference statistics, as guided-diffusion's evaluator uses them.

A reference batch `.npz` (e.g. `VIRTUAL_imagenet256_labeled.npz`) holds `mu`, `sigma` (pool features, 2048) and
`mu_s`, `sigma_s` (spatial features, 2023), and usually the images `arr_0`. The evaluator takes FID/sFID
statistics from the file when `mu` is there and computes them from `arr_0` otherwise; precision and recall need
the reference pool features themselves, computed from `arr_0` (or read from a `pool` array, which
`save_reference` writes so that they are computed once).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from promoe.errors import Refusal, written_atomically
from promoe.eval.images import NpzImages, check_enough, npz_array, open_images, rows_within_budget
from promoe.eval.metrics import FixedStats, GaussianStats

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class InceptionFeatures:
    """pool / spatial statistics (for FID / sFID), the pool features (precision, recall) and logits (IS), or
    None where they were not kept."""

    pool_stats: GaussianStats | FixedStats
    spatial_stats: GaussianStats | FixedStats
    pool: np.ndarray | None = None     # float32 [N, 2048]
    logits: np.ndarray | None = None   # float32 [N, 1008]


@torch.inference_mode()
def inception_features(images, net, batch_size: int = 64, device="cpu", keep_logits: bool = True,
                       desc: str = "inception") -> InceptionFeatures:
    """Run the FID Inception over an image source (`open_images`) batch by batch: streaming float64 statistics,
    float32 pool features and logits."""
    pool_stats, spatial_stats = GaussianStats(2048), GaussianStats(2023)
    pools, logits = [], []
    total = -(-len(images) // rows_within_budget(batch_size, images.shape))
    for batch in tqdm(images.batches(batch_size), total=total, desc=desc, unit="batch"):
        out = net(torch.from_numpy(batch).to(device))
        pool = out["pool"].float().cpu().numpy()
        pool_stats.update(pool)
        spatial_stats.update(out["spatial"].float().cpu().numpy())
        pools.append(pool)
        if keep_logits:
            logits.append(out["logits"].float().cpu().numpy())
    return InceptionFeatures(pool_stats, spatial_stats, np.concatenate(pools),
                             np.concatenate(logits) if keep_logits else None)


def read_reference(path, net=None, batch_size: int = 64, device="cpu", need_pool: bool = True) -> InceptionFeatures:
    """Reference statistics (and pool features when `need_pool`) from a reference `.npz`, an `.npz` of images or
    a folder of PNGs. `net` (the FID Inception) is needed only when something must be computed from images; a
    reference without images or `pool` features gives `pool=None` (no precision / recall)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as npz:
            keys = set(npz.files)
            stats = {key: npz_array(npz, key, path) for key in STATS_KEYS if key in keys}
            pool = npz_array(npz, "pool", path).astype(np.float32) if "pool" in keys else None
        check_finite({**stats, "pool": pool}, path)
        has_stats = len(stats) == len(STATS_KEYS)
        if 0 < len(stats) < len(STATS_KEYS):
            raise Refusal(f"{path}: holds {sorted(stats)} but not all of {list(STATS_KEYS)}")
        if has_stats and (pool is not None or not need_pool or "arr_0" not in keys):
            return InceptionFeatures(FixedStats(stats["mu"], stats["sigma"]),
                                     FixedStats(stats["mu_s"], stats["sigma_s"]), pool)
        if "arr_0" not in keys:
            raise Refusal(f"{path}: neither reference statistics ({', '.join(STATS_KEYS)}) nor images (arr_0); "
                          f"it holds {sorted(keys)}")
        images = NpzImages(path)
    else:
        images = open_images(path)
        has_stats = False
    check_enough(images, str(path))
    if net is None:
        raise Refusal(f"{path}: reference features must be computed from its images, which needs the Inception")
    features = inception_features(images, net, batch_size, device, keep_logits=False, desc="reference")
    if has_stats:  # as the evaluator: FID statistics from the file, features from the images
        features.pool_stats = FixedStats(stats["mu"], stats["sigma"])
        features.spatial_stats = FixedStats(stats["mu_s"], stats["sigma_s"])
    return features


def check_finite(arrays: dict[str, np.ndarray | None], path) -> None:
    """A reference holding NaN or inf would give NaN metrics that look like results: refuse it, naming the array."""
    for key, array in arrays.items():
        if array is not None and not np.isfinite(array).all():
            bad = np.size(array) - np.isfinite(array).sum()
            raise Refusal(f"{path}: '{key}' holds {bad} NaN or infinite values of {np.size(array)}: the reference "
                          "is damaged; recompute it from its images (--save-ref)")


def save_reference(path, features: InceptionFeatures) -> None:
    """An `.npz` in the evaluator's reference layout (mu, sigma, mu_s, sigma_s) plus the pool features (`pool`)."""
    arrays = dict(mu=features.pool_stats.mu, sigma=features.pool_stats.sigma,
                  mu_s=features.spatial_stats.mu, sigma_s=features.spatial_stats.sigma)
    if features.pool is not None:
        arrays["pool"] = features.pool
    with written_atomically(path) as tmp, open(tmp, "wb") as file:  # a file object: savez adds no ".npz"
        np.savez(file, **arrays)
