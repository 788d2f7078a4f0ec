"""Cached VAE latents, in our sharded layout or in the official ProMoE per-image layout.

Our layout (written by `python -m promoe.data.preprocess`)::

    out/meta.json                 format, image_size, vae, scaling_factor, latent_channels, latent_size, dtype,
                                  num_images, shard_size, num_shards, class_names (label i = class_names[i])
    out/shard_00000.safetensors   images [0, shard_size) of the sorted image list, then the next shard_size, ...

    shard tensors   moments  [n, 2, 2C, h, w] float32 (or float16): moments[i, 0] is the VAE posterior of image i,
                             moments[i, 1] that of its horizontal flip; channels [:C] the mean, [C:] the log-variance
                             (diffusers' `latent_dist.parameters`, unclamped)
                    labels   int64 [n], the image's class sub-folder in sorted order
    shard metadata  format "promoe-latents-v1", first_index (global index of row 0), image_size,
                    files (JSON list of the source paths relative to the image folder)

The official layout (ali-vilab/ProMoE `preprocess/preprocess_vae.py`) mirrors the image tree with one
`<class>/<name>.latent.npz` per image holding `latent` and `latent_flip`. The official script saves
`vae.encode(x).latent_dist.parameters`, i.e. posterior moments [2C, h, w] (8 channels for SD's VAE: mean then
log-variance), and its training loop samples them with `DiagonalGaussianDistribution(z).sample() * 0.18215`. Files
of C channels (a latent already sampled, or the posterior mode, unscaled as the VAE gives it) are read too: they
are only multiplied by the scaling factor. Which one a folder holds is told by its channel count against
`latent_channels`. Labels are the sorted order of the class sub-folders of the latent tree, as in ImageNet folders
and the official `CustomImageFolder`.

Either way `batch(indices, generator)` draws for each item a horizontal flip (p = 1/2) and, for moments, the
posterior noise from `generator`: latent = (mean + exp(logvar / 2) * eps) * scaling_factor, log-variance clamped
to [-30, 20] as diffusers does. A file that cannot be read is a Refusal naming its path.
"""

import bisect
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from promoe.data.images import scan_class_folders
from promoe.data.vae import sample_posterior
from promoe.errors import Refusal, parse_json, read_small_text

FORMAT = "promoe-latents-v1"
SD_VAE_SCALING_FACTOR = 0.18215
NPZ_SUFFIX = ".latent.npz"


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"shard_{index:05d}.safetensors"


class _Shards:
    """The shards of our layout, indexed at init from their headers and labels; opened (memory-mapped) lazily."""

    moments = True

    def __init__(self, folder: Path, paths: list[Path], meta: dict | None):
        self.paths = paths
        if meta is not None:
            missing = [shard_path(folder, i).name for i in range(meta["num_shards"])
                       if not shard_path(folder, i).exists()]
            if missing:
                raise Refusal(f"{folder}: preprocessing unfinished, {len(missing)} of {meta['num_shards']} shards "
                              f"missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); rerun "
                              "promoe.data.preprocess with the same arguments to finish")
        offsets, labels, shape = [0], [], None
        for path in paths:
            try:
                with safe_open(path, framework="pt") as file:
                    header = file.metadata() or {}
                    moments_shape = list(file.get_slice("moments").get_shape())
                    shard_labels = file.get_tensor("labels")
            except (SafetensorError, OSError, KeyError) as error:
                raise Refusal(f"{path}: cannot read latent shard ({error})") from error
            if header.get("format") != FORMAT:
                raise Refusal(f"{path}: not a {FORMAT} shard (metadata format {header.get('format')!r})")
            n = len(shard_labels)
            if len(moments_shape) != 5 or moments_shape[0] != n or moments_shape[1] != 2 or moments_shape[2] % 2:
                raise Refusal(f"{path}: moments {moments_shape} and labels [{n}] are not [n, 2, 2C, h, w] and [n]")
            if shape is not None and moments_shape[2:] != shape:
                raise Refusal(f"{path}: moments of shape {moments_shape[2:]}, shard {paths[0].name} has {shape}")
            if int(header.get("first_index", -1)) != offsets[-1]:
                raise Refusal(f"{path}: starts at image {header.get('first_index')}, the shards before it end at "
                              f"{offsets[-1]}: a shard is missing (rerun promoe.data.preprocess to finish)")
            shape = moments_shape[2:]
            offsets.append(offsets[-1] + n)
            labels.append(shard_labels.long())
        if meta is not None and offsets[-1] != meta["num_images"]:
            raise Refusal(f"{folder}: the shards hold {offsets[-1]} images, meta.json says {meta['num_images']}")
        self.offsets = offsets
        self.labels = torch.cat(labels)
        self.stored_shape = tuple(shape)  # (2C, h, w)
        self._open: dict[int, object] = {}

    def __getstate__(self) -> dict:  # open shards are memory maps: a process that unpickles opens its own
        return {**self.__dict__, "_open": {}}

    def read(self, index: int, flip: bool) -> torch.Tensor:
        shard = bisect.bisect_right(self.offsets, index) - 1
        row = index - self.offsets[shard]
        if shard not in self._open:
            try:
                self._open[shard] = safe_open(self.paths[shard], framework="pt")
            except (SafetensorError, OSError) as error:
                raise Refusal(f"{self.paths[shard]}: cannot read latent shard ({error})") from error
        return self._open[shard].get_slice("moments")[row:row + 1, int(flip):int(flip) + 1][0, 0]


class _NpzFiles:
    """The official per-image `.latent.npz` files (keys `latent`, `latent_flip`), read when a batch needs them."""

    def __init__(self, folder: Path, latent_channels: int):
        self.folder = folder
        self.class_names, self.files, self.labels = scan_class_folders(folder, (NPZ_SUFFIX,))
        self.stored_shape = None
        first = self.read(0, False)
        if first.ndim != 3 or first.shape[0] not in (latent_channels, 2 * latent_channels):
            raise Refusal(f"{folder / self.files[0]}: latent of shape {tuple(first.shape)}, expected "
                          f"[{2 * latent_channels}, h, w] (posterior moments) or [{latent_channels}, h, w] "
                          f"(a sampled latent) for a VAE of {latent_channels} latent channels")
        self.moments = first.shape[0] == 2 * latent_channels
        self.stored_shape = tuple(first.shape)

    def read(self, index: int, flip: bool) -> torch.Tensor:
        path = self.folder / self.files[index]
        key = "latent_flip" if flip else "latent"
        try:
            with np.load(path) as file:
                array = file[key]
        except Exception as error:  # zip, zlib, pickle, key and OS errors all mean the same: a bad file
            raise Refusal(f"{path}: cannot read {key} ({type(error).__name__}: {error})") from error
        if self.stored_shape is not None and array.shape != self.stored_shape:
            raise Refusal(f"{path}: {key} has shape {array.shape}, the other files {self.stored_shape}")
        return torch.from_numpy(array)


class LatentDataset:
    """Cached VAE latents of a folder, in our sharded layout or the official `.latent.npz` one (module docstring).

    `scaling_factor` None takes the VAE's from the folder's meta.json, else SD-VAE's 0.18215. `latent_channels`
    (C) only matters for `.latent.npz` files: 2C channels are posterior moments, C a sampled latent.
    """

    def __init__(self, folder: str | Path, scaling_factor: float | None = None, latent_channels: int = 4):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: no such latent folder")
        meta_path = self.folder / "meta.json"
        try:
            meta = parse_json(read_small_text(meta_path, "the latents' meta")) if meta_path.exists() else None
        except (OSError, ValueError) as error:
            raise Refusal(f"{meta_path}: cannot read ({error})") from error
        shards = sorted(self.folder.glob("shard_*.safetensors"))
        if shards:
            self.source = _Shards(self.folder, shards, meta)
            self.class_names = (meta or {}).get("class_names")
            self.layout = "shards"
        else:
            if not any(p.is_dir() and not p.name.startswith(".") for p in self.folder.iterdir()):
                raise Refusal(f"{self.folder}: no latent shards (shard_*.safetensors) and no class folders of "
                              f"*{NPZ_SUFFIX} files")
            self.source = _NpzFiles(self.folder, latent_channels)
            self.class_names = self.source.class_names
            self.layout = "npz"
        if scaling_factor is None:
            scaling_factor = (meta or {}).get("scaling_factor", SD_VAE_SCALING_FACTOR)
        self.scaling_factor = float(scaling_factor)
        self.labels = self.source.labels
        self.num_classes = len(self.class_names) if self.class_names else int(self.labels.max()) + 1
        channels, height, width = self.source.stored_shape
        self.sample_shape = (channels // 2 if self.source.moments else channels, height, width)
        self.name = f"latents {self.folder.name} ({self.layout})"

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor, generator: torch.Generator, rows: slice = slice(None)
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents float [b, C, h, w], labels int64 [b]) of `indices[rows]`; the flips, then the posterior noise,
        are drawn from `generator` for all of `indices`, so a rank's rows are the same whatever the split."""
        flips = (torch.rand(len(indices), generator=generator) < 0.5)[rows].tolist()
        eps = torch.randn(len(indices), *self.sample_shape, generator=generator)[rows]
        stored = torch.stack([self.source.read(i, f) for i, f in zip(indices[rows].tolist(), flips)]).float()
        latents = sample_posterior(stored, eps) if self.source.moments else stored
        return latents * self.scaling_factor, self.labels[indices[rows]]
