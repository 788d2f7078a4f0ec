"""FID, sFID, Inception Score, improved precision and recall, as OpenAI's guided-diffusion evaluator defines them.

Reference: `evaluations/evaluator.py` of openai/guided-diffusion (the evaluator the ProMoE paper reports with).
- FID / sFID: the Fréchet distance of two Gaussians fitted to features (mean, unbiased covariance as `np.cov`),
  computed in float64 with `scipy.linalg.sqrtm`, an `eps` offset on the diagonals when the product is singular,
  and the small imaginary part of the square root dropped (ValueError if its diagonal is not ~0).
- Inception Score: softmax of the logits, split into consecutive chunks of `split_size` = 5000 samples (so 50,000
  samples make 10 splits), exp(mean KL(p(y|x) || p(y))) per chunk, averaged over the chunks.
- Precision / recall (Kynkäänniemi et al. 2019, k = 3): the radius of a feature is its squared distance to its
  k-th nearest neighbour within its own set (itself excluded); a feature of one set is "in" the other set's
  manifold if its squared distance to any feature of that set is <= that feature's radius. Precision is the
  fraction of samples in the reference manifold, recall the fraction of references in the sample manifold.
  The evaluator computes the distances in float16 (float32 when float16 overflows); we compute them in float32,
  which can only flip comparisons that tie to within float16 rounding.
"""

import warnings

import numpy as np
import torch
from scipy import linalg

from promoe.errors import Refusal


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise Refusal(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                      f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # the product is (nearly) singular: offset both diagonals
        warnings.warn(f"singular product of covariances in the Fréchet distance; adding {eps} to their diagonals",
                      stacklevel=2)
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding leaves a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class GaussianStats:
    """Mean and covariance of features that arrive batch by batch: float64 running sum and sum of outer products,
    so a 50,000 x 2048 set never sits in memory. Up to float64 rounding, the result does not depend on how the
    features were split into batches. Save and load in the evaluator's reference layout with `mu` / `sigma`."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.sum_D = np.zeros(dim, np.float64)
        self.sum_outer_DD = np.zeros((dim, dim), np.float64)

    def update(self, features_ND) -> "GaussianStats":
        x_ND = np.asarray(features_ND.detach().cpu() if torch.is_tensor(features_ND) else features_ND, np.float64)
        x_ND = x_ND.reshape(len(x_ND), -1)
        if x_ND.shape[1] != self.dim:
            raise ValueError(f"features of dimension {x_ND.shape[1]} added to statistics of dimension {self.dim}")
        self.count += len(x_ND)
        self.sum_D += x_ND.sum(0)
        self.sum_outer_DD += x_ND.T @ x_ND
        return self

    @property
    def mu(self) -> np.ndarray:
        return self.sum_D / self.count

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (divides by count - 1, as `np.cov`)."""
        if self.count < 2:
            raise Refusal(f"a covariance needs at least 2 features, got {self.count}")
        mu = self.mu
        return (self.sum_outer_DD - self.count * np.outer(mu, mu)) / (self.count - 1)

    def frechet_distance(self, other: "GaussianStats") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


class FixedStats:
    """Statistics given as (mu, sigma), e.g. read from a reference batch; same interface as GaussianStats."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu, self.sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)

    def frechet_distance(self, other) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def inception_score(logits_NC, split_size: int = 5000) -> float:
    """Mean over chunks of `split_size` consecutive samples of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits)."""
    logits_NC = torch.as_tensor(np.asarray(logits_NC), dtype=torch.float64)
    scores = []
    for chunk in logits_NC.split(split_size):
        log_p = torch.log_softmax(chunk, dim=1)  # float64 log-softmax: no 0 * log 0 from an underflowed softmax
        log_marginal = torch.logsumexp(log_p, dim=0) - np.log(len(chunk))  # log of the mean of p over the chunk
        kl = (log_p.exp() * (log_p - log_marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def _squared_distances(u_MD: torch.Tensor, v_ND: torch.Tensor) -> torch.Tensor:
    """max(|u|^2 - 2 u.v + |v|^2, 0), the evaluator's expansion, in float32."""
    norms_M1 = (u_MD * u_MD).sum(1, keepdim=True)
    norms_1N = (v_ND * v_ND).sum(1)[None]
    return (norms_M1 - 2 * u_MD @ v_ND.T + norms_1N).clamp_min(0)


def manifold_radii(features_ND, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Squared distance of each feature to its k-th nearest neighbour in the same set (itself excluded): [N]."""
    x_ND = torch.as_tensor(np.asarray(features_ND), dtype=torch.float32)
    if len(x_ND) <= k:
        raise Refusal(f"precision/recall with k={k} needs more than {k} features, got {len(x_ND)}")
    # the (k+1)-th smallest of a row, as the evaluator's partition at index k (the row holds the self-distance 0)
    return torch.cat([_squared_distances(rows, x_ND).kthvalue(k + 1, dim=1).values for rows in x_ND.split(block)])


def precision_recall(reference_ND, samples_ND, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """(precision, recall) of samples against references, on features such as Inception pool features."""
    ref_ND = torch.as_tensor(np.asarray(reference_ND), dtype=torch.float32)
    sam_ND = torch.as_tensor(np.asarray(samples_ND), dtype=torch.float32)
    ref_radii, sam_radii = manifold_radii(ref_ND, k, block), manifold_radii(sam_ND, k, block)
    ref_in_samples = torch.zeros(len(ref_ND), dtype=torch.bool)  # reference inside the sample manifold: recall
    sam_in_reference = torch.zeros(len(sam_ND), dtype=torch.bool)  # sample inside the reference manifold: precision
    for start in range(0, len(ref_ND), block):
        stop = start + block
        d_RS = _squared_distances(ref_ND[start:stop], sam_ND)
        ref_in_samples[start:stop] = (d_RS <= sam_radii[None]).any(1)
        sam_in_reference |= (d_RS <= ref_radii[start:stop, None]).any(0)
    return sam_in_reference.double().mean().item(), ref_in_samples.double().mean().item()
