"""The demo recipe's pieces: the learning-rate warm-up, the EMA warm-up and the conditional accuracy of samples."""

import pytest
import torch
from torch import nn

from promoe.eval import conditional_accuracy
from promoe.train_config import OptimSection
from promoe.training.ema import EMA
from promoe.training.optimizer import learning_rate


def test_learning_rate_rises_linearly_over_the_warmup_then_holds():
    optim = OptimSection(lr=1e-3, warmup_steps=50)
    assert learning_rate(optim, 0) == pytest.approx(1e-3 / 50)
    assert learning_rate(optim, 24) == pytest.approx(1e-3 / 2)
    assert learning_rate(optim, 49) == learning_rate(optim, 5000) == pytest.approx(1e-3)
    assert learning_rate(OptimSection(lr=1e-3, warmup_steps=0), 0) == 1e-3


def test_ema_warmup_forgets_the_initial_weights_of_a_short_run():
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.fill_(1.0)
    plain, warm = EMA(model, 0.995), EMA(model, 0.995, warmup=True)
    with torch.no_grad():
        model.weight.fill_(0.0)
    for step in range(100):
        plain.update(model, step)
        warm.update(model, step)
    # Without warm-up 0.995^100 = 61% of the initial weights remain; with it the product of the decays
    # (1+n)/(10+n), n < 100, leaves 9! 100! / 109! = 2.3e-13 of them (the cap 0.995 is reached at n = 1791).
    assert plain.params["weight"].mean().item() == pytest.approx(0.995 ** 100, rel=1e-4)
    assert warm.params["weight"].abs().max().item() < 1e-8
    assert warm.decay_at(0) == pytest.approx(0.1) and warm.decay_at(10_000) == 0.995


class ThresholdNet(nn.Module):
    """Classifies a grey image as class 1 when its mean is above 0, else class 0 (a net whose answers are known)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        bright = (x.mean(dim=(1, 2, 3)) > 0).long()
        return nn.functional.one_hot(bright, 10).float()


def test_conditional_accuracy_is_the_share_classified_as_their_label():
    white, black = torch.full((28, 28), 255, dtype=torch.uint8), torch.zeros(28, 28, dtype=torch.uint8)
    samples = torch.stack([white, white, black, black, white])
    labels = torch.tensor([1, 0, 0, 1, 1])  # right, wrong, right, wrong, right
    assert conditional_accuracy(samples, labels, ThresholdNet()) == pytest.approx(3 / 5)
