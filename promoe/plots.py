"""Pictures of a training run, drawn from its `metrics.csv`: the loss curves and the expert-load heat map."""

import csv
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from promoe.errors import written_atomically  # noqa: E402

NOT_LOSSES = {"step", "lr", "grad_norm", "loss_max", "elapsed_s"}
LOAD_COLUMN = re.compile(r"load_b(\d+)_e(\d+)")


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """Column name -> values; a resumed run logs again the steps after its checkpoint, the last row of a step wins."""
    rows: dict[int, dict] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            rows[int(row["step"])] = row
    ordered = [rows[step] for step in sorted(rows)]
    return {name: np.array([float(row[name]) for row in ordered]) for name in ordered[0]} if ordered else {}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` values (shorter at the start), so the curve starts at the first step."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def plot_losses(metrics_csv: Path, out_png: Path) -> None:
    """Every loss term against the step, log scale, raw values faint and a trailing mean over 2% of the run."""
    metrics = read_metrics(metrics_csv)
    steps = metrics["step"]
    window = max(1, len(steps) // 50)
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, values in metrics.items():
        if name in NOT_LOSSES or LOAD_COLUMN.fullmatch(name) or not np.any(values > 0):
            continue
        line, = axis.plot(steps, smooth(values, window), label=name)
        axis.plot(steps, values, color=line.get_color(), alpha=0.2, linewidth=0.5)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(f"{Path(metrics_csv).parent.name}: training losses (mean of {window} logged steps)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, out_png)


def save_figure(figure, path: Path, dpi: int = 120) -> None:
    """The figure as a PNG through a temporary file (a full disk leaves the picture of before), then closed."""
    try:
        with written_atomically(path) as tmp:
            figure.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(figure)


def plot_expert_load(metrics_csv: Path, out_png: Path) -> bool:
    """Heat map of the share of slots each expert computed per MoE layer, over the last 10% of logged steps.
    Returns False (and draws nothing) for a model without MoE layers."""
    metrics = read_metrics(metrics_csv)
    cells = {tuple(map(int, match.groups())): values for name, values in metrics.items()
             if (match := LOAD_COLUMN.fullmatch(name))}
    if not cells:
        return False
    blocks = sorted({block for block, _ in cells})
    experts = max(expert for _, expert in cells) + 1
    tail = max(1, len(metrics["step"]) // 10)
    share = np.array([[cells[block, e][-tail:].mean() if (block, e) in cells else np.nan for e in range(experts)]
                      for block in blocks])
    figure, axis = plt.subplots(figsize=(1 + 0.6 * experts, 1 + 0.5 * len(blocks)))
    image = axis.imshow(share, cmap="viridis", vmin=0, aspect="auto")
    for (row, column), value in np.ndenumerate(share):
        axis.text(column, row, f"{value:.2f}", ha="center", va="center", color="w", fontsize=7)
    axis.set_xticks(range(experts), [str(e) for e in range(experts)])
    axis.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks])
    axis.set_xlabel("expert (the last one of a ProMoE bank is the unconditional expert)")
    axis.set_title(f"share of each layer's slots, last {tail} logged steps")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    save_figure(figure, out_png)
    return True
