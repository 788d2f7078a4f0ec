"""What every bench script writes: a JSON record of the run, a markdown table, a bar chart."""

import json
import os
import platform
from pathlib import Path

import torch

THROUGHPUT_KEYS = ("tokens_per_s", "images_per_s")


def parse_override(item: str):
    key, _, value = item.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def machine() -> dict:
    import triton

    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                triton=triton.__version__,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def run_record(config: dict, results: list[dict]) -> dict:
    return dict(machine=machine(), config=config, results=results)


def markdown_table(run: dict, title: str) -> str:
    columns = list(run["results"][0])
    lines = [f"### {title}", "", f"machine: {run['machine']}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for row in run["results"]:
        cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else ("" if row[c] is None else str(row[c]))
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(run: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next(k for k in THROUGHPUT_KEYS if k in run["results"][0])
    rows = [r for r in run["results"] if r[key]]
    labels = [f"{r['backend']}\n{r['mode']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, len(rows) * 0.9), 3.5))
    ax.bar(labels, [r[key] for r in rows], color=["C0" if r["mode"] == "fwd" else "C1" for r in rows])
    ax.set_ylabel(key.replace("_per_s", " / s"))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def emit(run: dict, json_path: Path | None, title: str) -> None:
    table = markdown_table(run, title)
    print(table)
    if json_path is None:
        return
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(run, indent=2))
    json_path.with_suffix(".md").write_text(table)
    if not any(key in run["results"][0] for key in THROUGHPUT_KEYS):
        print(f"wrote {json_path} and its .md")
        return
    try:
        import matplotlib  # noqa: F401  (the lent GPU machine may not have it: the figures matter, the chart not)
    except ImportError:
        print(f"wrote {json_path} and its .md (no chart: matplotlib is not installed)")
        return
    bar_chart(run, title, json_path.with_suffix(".png"))
    print(f"wrote {json_path} and its .md and .png")
