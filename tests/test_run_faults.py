"""Runs that survive their users (issue 13 items 2-11): verified checkpoints, divergence caught before it is saved,
one run per folder, fresh starts that destroy nothing, honest resume, preemption, a full disk, corrupt images.

The pieces are tested in-process on a group of one gloo rank; the driver end to end only where the wiring is the
point (a subprocess costs seconds of imports)."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from promoe.train_config import load_config
from tests.helpers import torchrun
from tests.test_train import ROOT, TINY_RUN, run

DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture
def group(tmp_path):
    """A process group of one gloo rank, as the driver makes for a single process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_state(*overrides):
    """(config, sharded model, optimizer, EMA) of the tiny demo run, as the driver builds them."""
    from promoe.training.ema import EMA
    from promoe.training.optimizer import make_optimizer
    from promoe.training.parallel import build_on_meta, parallelise

    config = load_config(DEMO, [*TINY_RUN, *overrides])
    model = build_on_meta(config)
    parallelise(model, config, torch.device("cpu"))
    return config, model, make_optimizer(model, config.optim), EMA(model, config.train.ema_decay)


def driver(out, *extra, timeout=600):
    """The driver's completed process (any exit status) on the tiny demo run."""
    command = [sys.executable, str(ROOT / "train" / "run.py"), "--config", str(DEMO), "--out", str(out), *TINY_RUN,
               *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# -- initialisation (issue 12 item 3): built on meta, the weights of today's single-process CPU build -------------

@pytest.mark.parametrize("sharded", [False, True], ids=["plain (one fp32 process)", "fully_shard"])
def test_the_model_starts_from_the_weights_of_a_seeded_cpu_build(group, sharded):
    import promoe
    from promoe.training.parallel import build_on_meta, materialise_and_initialise, parallelise, shard
    from promoe.training.ranks import full

    config = load_config(DEMO, [*TINY_RUN, "model.name=DiffMoE-S", "model.overrides.experts=E4A1S0U0"])
    model = build_on_meta(config)
    if sharded:  # as on several ranks or in bf16
        shard(model, torch.float32)
        materialise_and_initialise(model, config, torch.device("cpu"))
    else:
        parallelise(model, config, torch.device("cpu"))
    torch.manual_seed(config.train.seed)
    reference = promoe.build_model(config.model.name, **config.model.overrides)
    expected = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    got = [*model.named_parameters(), *model.named_buffers()]
    assert {name for name, _ in got} == set(expected)
    assert all(hasattr(tensor, "full_tensor") == sharded for _, tensor in model.named_parameters())
    for name, tensor in got:
        assert torch.equal(full(tensor), expected[name]), name
    # The init rules hold: adaLN modulation and the output layer start at zero.
    assert not full(model.final_layer.linear.weight).any()
    assert not full(model.blocks[0].adaLN_modulation[-1].weight).any()


# -- item 2: digests --------------------------------------------------------------------------------------------

def test_a_changed_or_truncated_checkpoint_file_is_named_and_the_newest_intact_one_used(group, tmp_path, capsys):
    from promoe.training.checkpoints import MANIFEST, Checkpoints

    config, model, optimizer, ema = tiny_state()
    checkpoints = Checkpoints(tmp_path, keep=3)
    data = {"name": "test", "size": 16}
    for step in (1, 2, 3):
        checkpoints.save(step, model, optimizer, ema, config, data)
    manifest = json.loads((tmp_path / "checkpoints" / "step_0000003" / MANIFEST).read_text())["files"]
    assert {".metadata", "config.json", "meta.json"} < set(manifest)
    shard = next(name for name in manifest if name.endswith(".distcp"))

    changed = tmp_path / "checkpoints" / "step_0000003" / shard
    content = bytearray(changed.read_bytes())
    content[len(content) // 2] ^= 0xFF
    changed.write_bytes(bytes(content))
    truncated = tmp_path / "checkpoints" / "step_0000002" / shard
    truncated.write_bytes(truncated.read_bytes()[:-100])

    assert checkpoints.newest_intact() == tmp_path / "checkpoints" / "step_0000001"
    said = capsys.readouterr().out
    assert f"{changed} does not match the digest" in said and f"{truncated} holds" in said and "truncated" in said
    assert (tmp_path / "checkpoints" / "step_0000003.damaged").is_dir()
    assert checkpoints.load(tmp_path / "checkpoints" / "step_0000001", model, optimizer, ema)["step"] == 1


def test_pruning_keeps_the_highest_steps_by_number_and_the_checkpoint_latest_names(group, tmp_path):
    from promoe.training.checkpoints import Checkpoints

    root = tmp_path / "checkpoints"
    for name in ("step_0000009", "step_0000010", "step_10000000", "step_0000003"):
        (root / name).mkdir(parents=True)
    (root / "latest").write_text("step_0000003")
    checkpoints = Checkpoints(tmp_path, keep=2)
    checkpoints.prune()
    assert sorted(path.name for path in root.glob("step_*")) == ["step_0000003", "step_0000010", "step_10000000"]


# -- item 3: divergence ------------------------------------------------------------------------------------------

def test_divergence_stops_before_saving_and_names_the_checkpoint_saved_before_it(tmp_path):
    # lr 1e30: step 1 is finite and saved, step 2's forward overflows.
    result = driver(tmp_path, "--max-steps", "4", "--ckpt-every", "1", "optim.lr=1e30")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "training diverged at step 2" in result.stderr
    assert f"the newest checkpoint saved before it is {tmp_path / 'checkpoints' / 'step_0000001'}" in result.stderr
    assert sorted(path.name for path in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000001"]


# -- items 4 and 6: one run per folder, fresh starts, leftovers, one metrics row per step --------------------------

def test_a_fresh_start_refuses_a_used_folder_and_restart_moves_the_old_run_aside(tmp_path):
    run(tmp_path, "--max-steps", "1", timeout=600)
    before = (tmp_path / "metrics.csv").read_text()
    refused = driver(tmp_path, "--max-steps", "1", "--no-resume")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "holds another run (step_0000001, ema.safetensors)" in refused.stderr and "--restart" in refused.stderr
    assert (tmp_path / "metrics.csv").read_text() == before  # nothing touched

    result = run(tmp_path, "--max-steps", "1", "--restart", "train.seed=1", timeout=600)
    assert "moved the previous run" in result.stdout
    old = next(tmp_path.glob("old-*"))
    assert (old / "checkpoints" / "step_0000001").is_dir() and (old / "metrics.csv").read_text() == before
    assert (tmp_path / "checkpoints" / "step_0000001").is_dir() and (tmp_path / "metrics.csv").read_text() != before


def test_a_second_run_on_a_locked_folder_stops_naming_the_first(group, tmp_path):
    from promoe.training.folder import lock_folder

    held = lock_folder(tmp_path)
    try:
        with pytest.raises(SystemExit) as stopped:
            lock_folder(tmp_path)
    finally:
        held.close()
    message = str(stopped.value.code)
    assert f"{tmp_path} is in use by another run" in message
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in message
    lock_folder(tmp_path).close()  # released with its file: the next run takes it


def test_leftovers_of_killed_writes_are_removed(tmp_path, capsys):
    from promoe.training.folder import remove_leftovers

    (tmp_path / "checkpoints" / "step_0000004.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000002").mkdir()
    (tmp_path / "checkpoints" / "latest.tmp").write_text("step_0000004")
    (tmp_path / "ema.safetensors.tmp").write_bytes(b"half")
    remove_leftovers(tmp_path)
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["checkpoints", "step_0000002"]
    assert capsys.readouterr().out.count("left by a write that was killed") == 3


def test_a_resumed_run_keeps_one_metrics_row_per_step(tmp_path):
    from promoe.training.metrics import MetricsLog

    (tmp_path / "metrics.csv").write_text("step,loss\r\n1,0.5\r\n2,0.4\r\n3,0.3\r\n4,0.2\r\n")
    log = MetricsLog(tmp_path, start=2)
    log.append({"step": 3, "loss": 0.25})
    log.close()
    assert (tmp_path / "metrics.csv").read_text().split() == ["step,loss", "1,0.5", "2,0.4", "3,0.25"]


# -- items 7 and 8: what a resume may change ---------------------------------------------------------------------

def saved_checkpoint(folder: Path, config, data: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config.to_json())
    (folder / "meta.json").write_text(json.dumps({"step": 5, "data": data}))
    return folder


def test_resume_lists_changed_settings_and_refuses_another_model_objective_or_data_set(tmp_path):
    from promoe.training.resume import check_resumable

    data = {"name": "fashion-mnist", "size": 60000}
    folder = saved_checkpoint(tmp_path / "step_0000005", load_config(DEMO, TINY_RUN), data)
    same = load_config(DEMO, [*TINY_RUN, "train.out=elsewhere"])  # where the run writes is no setting
    assert check_resumable(folder, same, data) == []
    changed = load_config(DEMO, [*TINY_RUN, "optim.lr=1e-5", "train.ema_decay=0.99"])
    saved = load_config(DEMO, TINY_RUN)
    assert check_resumable(folder, changed, data) == [f"optim.lr: {saved.optim.lr} -> 1e-05",
                                                      f"train.ema_decay: {saved.train.ema_decay} -> 0.99"]
    with pytest.raises(SystemExit, match=r"was trained with model ProMoE-S \(depth: the checkpoint has 2, the "
                                         r"config asks for 4\)"):
        check_resumable(folder, load_config(DEMO, [*TINY_RUN, "model.overrides.depth=4"]), data)
    with pytest.raises(SystemExit, match="objective 'rf', the config asks for 'ddpm'"):
        check_resumable(folder, load_config(DEMO, [*TINY_RUN, "train.objective=ddpm"]), data)
    with pytest.raises(SystemExit, match=r"trained on the data set fashion-mnist \(60000 items\), this run would "
                                         r"train on fashion-mnist \(32 items\)"):
        check_resumable(folder, same, {"name": "fashion-mnist", "size": 32})


def test_an_explicit_data_folder_must_exist_and_hold_the_files(tmp_path):
    from promoe.data import build_dataset

    with pytest.raises(FileNotFoundError, match="no such folder"):
        build_dataset("pixels", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="lacks the Fashion-MNIST files train-images-idx3-ubyte.gz"):
        build_dataset("pixels", tmp_path)
    result = driver(tmp_path / "run", "--max-steps", "1", f"data.folder={tmp_path / 'missing'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"data: data.folder {tmp_path / 'missing'}: no such folder" in result.stderr


# -- item 9: preemption ------------------------------------------------------------------------------------------

def test_sigterm_ends_the_run_after_the_step_with_a_checkpoint(tmp_path):
    process = run(tmp_path, "--max-steps", "500", "--ckpt-every", "400", wait=False)
    wait_for_logged_steps(process, tmp_path, 2)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=600)[1].decode()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by a signal after step" in stderr and "Traceback" not in stderr
    last_logged = int((tmp_path / "metrics.csv").read_text().split()[-1].split(",")[0])
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{last_logged:07d}"
    assert not (tmp_path / "ema.safetensors").exists()  # stopped, not finished


def wait_for_logged_steps(process, out: Path, count: int) -> None:
    deadline = time.time() + 600
    while not (out / "metrics.csv").exists() or len((out / "metrics.csv").read_text().split()) <= count:
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_after_one_checkpoint(tmp_path):
    process = run(tmp_path, "--max-steps", "500", "--ckpt-every", "400", "model.overrides.rcl_weight=0",
                  launcher=torchrun(), wait=False)
    wait_for_logged_steps(process, tmp_path, 2)
    agent = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    workers = [int(pid) for pid in agent]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # one rank only: the flag travels in each step's all-reduce
    stderr = process.communicate(timeout=600)[1].decode()
    assert "stopped by a signal after step" in stderr
    last_logged = int((tmp_path / "metrics.csv").read_text().split()[-1].split(",")[0])
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{last_logged:07d}"
    result = run(tmp_path, "--max-steps", str(last_logged + 1), "model.overrides.rcl_weight=0", timeout=600)
    assert f"at step {last_logged}" in result.stdout


# -- item 10: a full disk ----------------------------------------------------------------------------------------

def test_a_full_disk_is_named_and_latest_left_intact(group, tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as filesystem

    from promoe.training.checkpoints import Checkpoints

    config, model, optimizer, ema = tiny_state()
    checkpoints = Checkpoints(tmp_path, keep=2)
    checkpoints.save(1, model, optimizer, ema, config, {})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(filesystem, "_write_item", no_space)
    with pytest.raises(SystemExit) as stopped:
        checkpoints.save(2, model, optimizer, ema, config, {})
    message = str(stopped.value.code)
    assert f"the disk holding {tmp_path / 'checkpoints'} is full" in message and "still names step_0000001" in message
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000001"
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000001"]


# -- item 11: a corrupt image ------------------------------------------------------------------------------------

def test_an_unreadable_image_is_reported_and_replaced_by_the_next_file(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from promoe.data.images import ImageFolderDataset

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(3):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{index}.jpg" if index else tmp_path / label / "0.png")
    broken = tmp_path / "a" / "1.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # a download cut short
    dataset = ImageFolderDataset(tmp_path, 16, workers=2)
    assert dataset.files[1] == os.path.join("a", "1.jpg")
    indices = torch.arange(6)
    for _ in range(2):  # every draw of the file gives the same replacement
        images, labels = dataset.batch(indices, torch.Generator().manual_seed(0))
        assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    flips = torch.rand(6, generator=torch.Generator().manual_seed(0)) < 0.5
    unflipped = images[1].flip(-1) if flips[1] else images[1]
    third = images[2].flip(-1) if flips[2] else images[2]
    assert torch.equal(unflipped, third)  # file 1 read as file 2
    assert capsys.readouterr().err.count(f"{broken}: cannot read image") == 1


# -- issue 22: every ordinary mistake ends in one clear line, nothing written before lost ---------------------------

def test_resume_falls_back_from_an_unverified_folder_it_cannot_read(group, tmp_path, capsys):
    import pickle

    from promoe.training.checkpoints import MANIFEST, Checkpoints

    config, model, optimizer, ema = tiny_state()
    checkpoints = Checkpoints(tmp_path, keep=3)
    for step in (1, 2):
        checkpoints.save(step, model, optimizer, ema, config, {})
    newest = tmp_path / "checkpoints" / "step_0000002"
    (newest / MANIFEST).unlink()  # as written before digests were recorded
    (newest / ".metadata").write_bytes(pickle.dumps({"not": "an index"}))
    assert checkpoints.newest_intact() == tmp_path / "checkpoints" / "step_0000001"
    assert f"{newest} is damaged: {newest / '.metadata'} holds a dict" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "step_0000002.damaged").is_dir()


@pytest.fixture
def driver_main(monkeypatch):
    """train/run.py's main, in this process (a group of one made and destroyed by it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_run", ROOT / "train" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)  # restored after the test
    return lambda *argv: module.main([*argv, *TINY_RUN])


def stopped_with(main, *argv) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(*argv)
    message = str(stopped.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_the_driver_names_a_missing_config_and_an_unusable_out_in_one_line(driver_main, tmp_path, monkeypatch):
    import promoe.training.folder

    missing = tmp_path / "missing.yaml"
    assert stopped_with(driver_main, "--config", str(missing)) == \
        f"config: config file {missing} does not exist: check the path (configs/ holds the shipped ones)"
    (tmp_path / "file").write_text("keep")
    assert f"cannot use {tmp_path / 'file'} as the run folder" in stopped_with(
        driver_main, "--config", str(DEMO), "--out", str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "keep"
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert f"{tmp_path / 'link'} is a link to {tmp_path / 'nowhere'}, which does not exist" in stopped_with(
        driver_main, "--config", str(DEMO), "--out", str(tmp_path / "link"))

    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(promoe.training.folder, "open", read_only, raising=False)
    assert "Permission denied: a read-only or someone else's folder?" in stopped_with(
        driver_main, "--config", str(DEMO), "--out", str(tmp_path / "run"))


def test_a_full_disk_during_the_ema_export_is_named_and_the_previous_export_kept(group, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import promoe.weights
    from promoe.training.checkpoints import export_ema

    config, model, _, ema = tiny_state()
    export_ema(model, ema, config, tmp_path, rank=0)
    before = (tmp_path / "ema.safetensors").read_bytes()

    def no_space(state, path, metadata):  # what safetensors raises on a full disk, its file half written
        Path(path).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(promoe.weights, "save_file", no_space)
    with pytest.raises(SystemExit) as stopped:
        export_ema(model, ema, config, tmp_path, rank=0)
    assert f"the disk holding {tmp_path} is full" in str(stopped.value.code)
    assert (tmp_path / "ema.safetensors").read_bytes() == before
    assert not (tmp_path / "ema.safetensors.tmp").exists()


def half_written_then_full(path, *args, **kwargs):
    Path(path).write_bytes(b"half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_while_drawing_the_plots_keeps_the_pictures_of_before(tmp_path, monkeypatch):
    import matplotlib.figure

    from promoe.errors import error_message
    from promoe.plots import plot_losses

    (tmp_path / "metrics.csv").write_text("step,loss\n1,0.5\n2,0.4\n")
    plot_losses(tmp_path / "metrics.csv", tmp_path / "loss.png")
    before = (tmp_path / "loss.png").read_bytes()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, **kw: half_written_then_full(path))
    with pytest.raises(OSError) as failed:
        plot_losses(tmp_path / "metrics.csv", tmp_path / "loss.png")
    assert "No space left on device: the disk is full; free space there" in error_message(failed.value)
    assert (tmp_path / "loss.png").read_bytes() == before and not (tmp_path / "loss.png.tmp").exists()


class FullDiskFile:
    """A file whose writes put a few bytes on the disk and then fail, as on a disk that fills up mid-write."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[:5])
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.file.name)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __iter__(self):
        return iter(self.file)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_while_logging_leaves_no_half_row_in_metrics_csv(tmp_path, monkeypatch):
    import builtins

    import promoe.training.metrics
    from promoe.training.metrics import MetricsLog

    (tmp_path / "metrics.csv").write_text("step,loss\r\n1,0.5\r\n")
    log = MetricsLog(tmp_path, start=1)
    monkeypatch.setattr(promoe.training.metrics, "open", lambda *args, **kwargs: FullDiskFile(
        builtins.open(*args, **kwargs)), raising=False)
    with pytest.raises(OSError, match="No space left on device"):
        log.append({"step": 2, "loss": 0.25})
    log.close()
    assert (tmp_path / "metrics.csv").read_bytes() == b"step,loss\r\n1,0.5\r\n"


def test_a_failed_metrics_write_stops_the_run_in_one_line(driver_main, tmp_path, monkeypatch):
    from promoe.training.metrics import MetricsLog

    def full(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(MetricsLog, "append", full)
    message = stopped_with(driver_main, "--config", str(DEMO), "--out", str(tmp_path), "--max-steps", "1")
    assert message == (f"error: writing metrics.csv at step 1: {tmp_path / 'metrics.csv'}: No space left on device: "
                       "the disk is full; free space there, then run the same command again")


@pytest.mark.parametrize("mistake, message", [
    ("empty", r"ema\.safetensors is not a readable safetensors file \(.*\): empty or cut short\?"),
    ("truncated", r"ema\.safetensors is not a readable safetensors file"),
    ("metadata", r"ema\.safetensors \(metadata\): model_config is not JSON"),
    ("config.json", r"step_0000003/config\.json is not valid JSON \(.*\): damaged\?"),
    ("checkpoints", r"checkpoints holds a run's checkpoints, not one saved step: give one of its step folders, e\.g\. "
                    r".*checkpoints/step_0000003, or"),
    ("dangling", r"checkpoint .*gone does not exist \(a link to .*nowhere, which does not exist\)"),
    ("pth", r"ckpt\.pth is not a readable torch checkpoint \(.*\): empty or cut short\?"),
])
def test_a_damaged_or_wrong_checkpoint_ends_sampling_in_one_line_naming_the_file(tiny_run, tmp_path, mistake,
                                                                                 message):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import promoe.sample

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    export, folder = run / "ema.safetensors", run / "checkpoints" / "step_0000003"
    ckpt = {"empty": export, "truncated": export, "metadata": export, "config.json": folder,
            "checkpoints": run / "checkpoints", "dangling": tmp_path / "gone", "pth": tmp_path / "ckpt.pth"}[mistake]
    if mistake == "empty":
        export.write_bytes(b"")
    elif mistake == "truncated":
        export.write_bytes(export.read_bytes()[:-100])
    elif mistake == "metadata":
        with safe_open(str(export), framework="pt") as file:
            metadata = {key: value for key, value in file.metadata().items() if key != "run_config"}
        save_file(load_file(str(export)), str(export), metadata={**metadata, "model_config": "{hidden_size: 3"})
    elif mistake == "config.json":
        (folder / "config.json").write_text("{")
        (folder / "manifest.json").unlink()
    elif mistake == "dangling":
        (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    elif mistake == "pth":
        (tmp_path / "ckpt.pth").write_bytes(b"")
    extra = ["--model", "ProMoE-S", "--objective", "rf"] if mistake == "pth" else []
    message_said = stopped_with(promoe.sample.main, ["--ckpt", str(ckpt), *extra, "--out", str(tmp_path / "s"),
                                                     "--steps", "1", "--num-images", "1"])
    assert message_said.startswith("error: ") and re.search(message, message_said), message_said
    assert not (tmp_path / "s").exists()
