"""The scalars of a step, averaged over ranks, and `metrics.csv` (plus TensorBoard events when it is installed)."""

import csv
import io
import os
from pathlib import Path

import torch
import torch.distributed as dist

from promoe.errors import Refusal, not_following_links, write_text_atomically


def reduce_logged(loss: torch.Tensor, terms: dict, routing: list, world_size: int) -> dict[str, float]:
    """The step's scalars averaged over ranks in one all-reduce: loss, each term, and per MoE layer the share of
    slots each expert computed (`load_b{block}_e{expert}`); plus `loss_max`, the worst rank's loss."""
    loads = [torch.stack(layer.loads_E).sum(0).float() for layer in routing]
    shares = [load / load.sum().clamp(min=1) for load in loads]
    logged = torch.cat([torch.stack([loss.detach().float()] + [v.detach().float() for v in terms.values()]),
                        *shares])
    dist.all_reduce(logged)
    logged /= world_size
    worst = loss.detach().float().clone()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    values = logged.tolist()
    names = ["loss", *terms] + [f"load_b{layer.block}_e{e}" for layer, share in zip(routing, shares)
                                for e in range(len(share))]
    logged = dict(zip(names, values))
    return {"loss": logged.pop("loss"), "loss_max": worst.item(), **logged}


class MetricsLog:
    """Rows of scalars into `metrics.csv`, one per logged step: a run that starts at step `start` (a resume, or 0)
    first drops the rows of later steps, which it logs again."""

    def __init__(self, out: Path, start: int):
        self.path = out / "metrics.csv"
        self.start = start
        self.header_checked = False
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.writer = None
        else:
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1)

    def read_lines(self) -> list[str]:
        """The lines of the file of a run that this one resumes (a binary file is refused, naming it)."""
        try:
            with open(self.path, newline="") as file:
                return file.read().splitlines(keepends=True)
        except UnicodeDecodeError:
            raise Refusal(f"{self.path} is not a text file of metrics (not UTF-8): move it aside, or give another "
                          "--out") from None

    def drop_rows_after(self, step: int) -> None:
        lines = self.read_lines()
        rows = list(csv.reader(lines))
        try:
            column = rows[0].index("step")
            kept = lines[:1] + [line for line, row in zip(lines[1:], rows[1:]) if row and int(row[column]) <= step]
        except (IndexError, ValueError):  # no header, no step column, a step that is no integer
            raise Refusal(f"{self.path} is not a file of metrics (each row's step in a column 'step'): move it "
                          "aside, or give another --out") from None
        if len(kept) < len(lines):
            write_text_atomically(self.path, "".join(kept))

    def append(self, row: dict) -> None:
        if not self.header_checked and self.path.exists():  # a resumed run appends to the file of its start
            header = next(csv.reader(self.read_lines()), [])
            if header != list(row):
                raise SystemExit(f"{self.path} has the columns {header}, this run logs {list(row)}: the run folder "
                                 "was written by another model or version; give another --out")
            self.drop_rows_after(self.start)
        self.header_checked = True
        self._write_row(row)
        if self.writer is not None:
            for name, value in row.items():
                if name != "step":
                    self.writer.add_scalar(name.replace("load_", "load/"), value, row["step"])
            self.writer.flush()

    def _write_row(self, row: dict) -> None:
        """The row (after the header, in a new file) in unbuffered writes; a failed write (a full disk) is cut off
        again, so the file never holds half a row and the rows of before stay whole."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(row))
        with open(self.path, "ab", buffering=0, opener=not_following_links) as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                writer.writeheader()
            writer.writerow(row)
            data = memoryview(text.getvalue().encode())
            try:
                while data:
                    data = data[file.write(data):]
            except OSError:
                file.truncate(size)
                raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
