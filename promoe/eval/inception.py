"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph, as pytorch-fid ported it) in plain PyTorch.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, loaded from a local path; nothing is ever
downloaded. The module names below are that file's keys (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.
running_mean`, ..., `fc.weight` [1008, 2048]). The FID graph differs from torchvision's Inception-v3 in three ways
that the blocks here follow: every average pool ignores the zero padding (TF's `count_include_pad=False`), the last
block (Mixed_7c) pools its pool branch with a max instead of an average, and the classifier has 1008 classes.

The graph's own preprocessing, reproduced by `preprocess`: uint8 NHWC -> float -> TF1 `ResizeBilinear` to 299x299
(align_corners=False, no half-pixel centres) -> (x - 128) / 128 (the graph's `Sub` 128 and `Mul` 1/128 nodes,
so the range is [-1, 0.992], not pytorch-fid's x / 127.5 - 1).
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from promoe.errors import Refusal

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # the evaluator keeps mixed_6/conv[..., :7]: 7 x 17 x 17 = 2023 sFID dimensions


def resize_bilinear_tf1(x_NCHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1's `resize_bilinear(align_corners=False)` without half-pixel centres, in float32.

    Source coordinate of output pixel i: i * (in / out) (torch's `interpolate` uses (i + 0.5) * in / out - 0.5).
    Neighbours floor / ceil of it (the upper one clamped to the edge), blended as TF's kernel does:
    top = tl + (tr - tl) * dx, bottom = bl + (br - bl) * dx, out = top + (bottom - top) * dy.
    """
    x_NCHW = x_NCHW.float()
    (lo_y, hi_y, dy), (lo_x, hi_x, dx) = (_tf1_source(n_in, n_out, x_NCHW.device)
                                          for n_in, n_out in zip(x_NCHW.shape[-2:], size))
    top_NCYW, bottom_NCYW = x_NCHW.index_select(2, lo_y), x_NCHW.index_select(2, hi_y)
    tl, tr = top_NCYW.index_select(3, lo_x), top_NCYW.index_select(3, hi_x)
    bl, br = bottom_NCYW.index_select(3, lo_x), bottom_NCYW.index_select(3, hi_x)
    top = tl + (tr - tl) * dx
    bottom = bl + (br - bl) * dx
    return top + (bottom - top) * dy[:, None]


def _tf1_source(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower index, upper index, lerp) of every output position along one axis."""
    scale = float(np.float32(n_in) / np.float32(n_out))  # TF: float scale, then float(i) * scale in float32
    source = torch.arange(n_out, dtype=torch.float32, device=device) * scale
    lower = source.floor()
    upper = source.ceil().clamp_max(n_in - 1)
    return lower.long(), upper.long(), source - lower


def preprocess(images_NHWC: torch.Tensor) -> torch.Tensor:
    """uint8 (or float in [0, 255]) [N, H, W, 3] -> float32 [N, 3, 299, 299], as the FID graph's first nodes."""
    x = resize_bilinear_tf1(images_NHWC.permute(0, 3, 1, 2), (INPUT_SIZE, INPUT_SIZE))
    return (x - 128) / 128


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 0.001, TF's) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3x3 stride-1 average pool that, as TF's, averages over the in-image pixels only."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions: 1x1 | 1x7, 7x1 | 7x1, 1x7, 7x1, 1x7 | avg pool -> 1x1."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(tf_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; pool branch: TF-style average (Mixed_7b) or max (Mixed_7c)."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """uint8 images [N, H, W, 3] -> {"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]}, float32.

    - pool: the graph's `pool_3` (global average of Mixed_7c), for FID and precision / recall.
    - spatial: the evaluator's `mixed_6/conv` sliced to its first 7 channels, for sFID. In the TF graph the mixed
      blocks are named mixed, mixed_1, ..., mixed_10 in order (Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c),
      so mixed_6 is Mixed_6d; inside a block the scope `conv` is its first branch, the 1x1 convolution
      (the other branches are `tower`, `tower_1`, `tower_2`), and the op named `mixed_6/conv` is that scope's
      output after batch norm and ReLU. Hence Mixed_6d.branch1x1's output [N, 192, 17, 17], channels 0..6,
      flattened in TF's NHWC order (h, w, c) so that the statistics match the reference batches' `mu_s`/`sigma_s`.
    - logits: pool @ fc.weight.T without the bias, as the evaluator computes them for the Inception Score (it reads
      the weight of `softmax/logits/MatMul` and multiplies by it alone). `fc.bias` is loaded but unused.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.initialize_weights()

    def initialize_weights(self):
        # Loading the pt_inception file replaces all of this; a random network (tests) keeps O(1) activations
        # through its 94 convolutions with He-normal convolutions and identity batch norms.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, images_NHWC: torch.Tensor) -> dict[str, torch.Tensor]:
        x = preprocess(images_NHWC)                                                   # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))             # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                              # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                                 # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                              # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))             # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]                    # (N, 7, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                            # (N, 2048, 8, 8)
        pool = x.mean((2, 3))                                                         # (N, 2048)
        return {
            "pool": pool,
            "spatial": spatial.permute(0, 2, 3, 1).flatten(1),                        # (N, 2023), NHWC order
            "logits": pool @ self.fc.weight.T,                                        # (N, 1008), no bias
        }


def check_state_dict(model: nn.Module, state_dict: dict, source: str = "state dict") -> None:
    """A Refusal naming the first missing, unexpected or misshaped key. `num_batches_tracked` is optional."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state_dict:
            if name.endswith("num_batches_tracked"):
                continue
            raise Refusal(f"{source}: missing key {name!r}; expected the layout of pytorch-fid's {WEIGHTS_NAME}")
        if tuple(state_dict[name].shape) != tuple(tensor.shape):
            raise Refusal(f"{source}: key {name!r} has shape {tuple(state_dict[name].shape)}, "
                          f"expected {tuple(tensor.shape)}")
    for name in state_dict:
        if name not in expected:
            raise Refusal(f"{source}: unexpected key {name!r}; expected the layout of pytorch-fid's {WEIGHTS_NAME}")


def load_inception(path, device="cpu") -> FIDInceptionV3:
    """The FID Inception with pytorch-fid's weights from a local file, in eval mode. Never downloads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}. Nothing is downloaded: fetch {WEIGHTS_NAME} yourself from "
            f"{WEIGHTS_URL} (pytorch-fid's port of TF's FID Inception graph) and give its path (--inception).")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise Refusal(f"{path}: not a torch state dict of tensors ({error})") from error
    if not isinstance(state_dict, dict):
        raise Refusal(f"{path}: holds a {type(state_dict).__name__}, not a state dict")
    model = FIDInceptionV3()
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict(state_dict, strict=False)  # strict except the optional num_batches_tracked, checked above
    return model.to(device).eval().requires_grad_(False)
