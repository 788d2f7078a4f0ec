"""Every error reaches the user in one line naming the file, key or rank (issue 32): the first rank that fails says
its own line and the others say which rank it was; deeply nested files, FIFOs, binary files, a finished run asked
for fewer steps, an override's true source, an image set too small to evaluate."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Two ranks under the driver's error path; rank 1 alone meets a damaged file while rank 0 waits in a collective.
TWO_RANKS = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from promoe.errors import Refusal, said_in_one_line
    from promoe.training.ranks import said_once

    dist.init_process_group("gloo")
    try:
        with said_once(), said_in_one_line():
            if dist.get_rank() == 1:
                raise Refusal("shard_00001.safetensors is damaged: preprocess it again")
            dist.barrier()
    finally:
        dist.destroy_process_group()
""")


def test_an_error_of_one_rank_is_said_by_it_and_the_others_name_it(tmp_path):
    import socket

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                 for rank in (0, 1)]
    said = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [1, 1]
    assert "Traceback" not in said[0] + said[1], said
    assert said[1].splitlines()[-1] == "error (rank 1 of 2): shard_00001.safetensors is damaged: preprocess it again"
    assert said[0].splitlines()[-1] == ("error (rank 0 of 2): stopped because rank 1 failed: shard_00001.safetensors "
                                        "is damaged: preprocess it again")


@pytest.mark.parametrize("name", ["manifest.json", "config.json", "meta.json"])
def test_a_deeply_nested_json_file_is_refused_in_one_line_naming_it(tmp_path, name):
    from promoe.checkpoint_format import read_manifest, read_meta, read_run_config

    (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000)
    read = {"manifest.json": lambda: read_manifest(tmp_path), "config.json": lambda: read_run_config(
        tmp_path / name), "meta.json": lambda: read_meta(tmp_path)}[name]
    with pytest.raises(ValueError, match=rf"{tmp_path / name}.*nested deeper than"):
        read()


def test_a_deeply_nested_yaml_config_or_override_is_refused_in_one_line(tmp_path):
    from promoe.train_config import load_config

    (tmp_path / "run.yaml").write_text("model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'run.yaml'}: nested deeper than"):
        load_config(tmp_path / "run.yaml")
    with pytest.raises(ValueError, match="a value on the command line: nested deeper than"):
        load_config(None, ["train.steps=" + "[" * 100_000])


@pytest.fixture
def two_checkpoints(tmp_path):
    """(the Checkpoints of a run folder holding steps 1 and 2, the folder of step 2), in a group of one gloo rank."""
    import torch.distributed as dist

    from promoe.training.checkpoints import Checkpoints
    from tests.test_run_faults import tiny_state

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        config, model, optimizer, ema = tiny_state()
        checkpoints = Checkpoints(tmp_path / "run", keep=3)
        for step in (1, 2):
            checkpoints.save(step, model, optimizer, ema, config, {})
        yield checkpoints, tmp_path / "run" / "checkpoints" / "step_0000002"
    finally:
        dist.destroy_process_group()


def test_a_resume_moves_aside_a_checkpoint_whose_manifest_is_nested_too_deeply(two_checkpoints, capsys):
    checkpoints, newest = two_checkpoints
    (newest / "manifest.json").write_text("{\"a\":" * 100_000)
    assert checkpoints.newest_intact() == newest.with_name("step_0000001")
    assert "nested deeper than" in capsys.readouterr().out and newest.with_name("step_0000002.damaged").is_dir()


def test_deeply_nested_weights_metadata_or_sampling_settings_are_refused_in_one_line(tmp_path):
    from promoe.sample import read_settings
    from promoe.sampling import load_model
    from tests.test_safe_loading import saved_tiny_weights

    path = tmp_path / "ema.safetensors"
    saved_tiny_weights(path)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    save_file(load_file(str(path)), str(path), metadata={**metadata, "model_config": "[" * 100_000})
    with pytest.raises(ValueError, match=r"ema\.safetensors \(metadata\): model_config .*nested deeper than"):
        load_model(path)
    (tmp_path / "sampling.json").write_text("{\"a\":" * 100_000)
    with pytest.raises(ValueError, match=r"sampling\.json is unreadable \(.*nested deeper than"):
        read_settings(tmp_path / "sampling.json")


def test_a_fifo_in_place_of_a_config_is_refused_without_waiting_for_a_writer(tmp_path):
    from promoe.checkpoint_format import read_run_config

    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} is not a regular file"):
        read_run_config(tmp_path / "config.json")  # before the fix: blocks for ever in open()


def test_a_command_line_override_is_reported_on_the_command_line():
    from tests.test_checkpoint_config import tiny_config

    for override in ("dispatch=foo", "activation=cube"):
        config = tiny_config(f"model.overrides.{override}")
        with pytest.raises(ValueError, match=r"\(on the command line\)$"):
            config.validate(world_size=1, source="configs/demo.yaml")


def test_evaluating_one_image_is_refused_at_once_naming_the_file(tmp_path):
    import numpy as np

    from promoe.evaluate import main

    np.savez(tmp_path / "one.npz", np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "one.npz"), "--ref", str(tmp_path / "one.npz"), "--inception", str(tmp_path / "no")])
    assert stop.value.code == (f"error: {tmp_path / 'one.npz'}: one image; the metrics need at least 2 "
                               "(their statistics hold a covariance)")


def test_a_binary_metrics_csv_on_resume_is_named_in_one_line(tmp_path):
    from promoe.training.metrics import MetricsLog

    (tmp_path / "metrics.csv").write_bytes(bytes(range(128, 256)) * 4)
    log = MetricsLog(tmp_path, start=2)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'metrics.csv'} is not a text file of metrics"):
        log.append({"step": 3, "loss": 0.5})
    log.close()


@pytest.mark.parametrize("text", ["step,loss\n1,0.5\nx,0.4\n", "step,loss\n1,0.5\n,0.4\n"])
def test_a_metrics_csv_without_integer_steps_on_resume_is_named_in_one_line(tmp_path, text):
    from promoe.errors import Refusal
    from promoe.training.metrics import MetricsLog

    (tmp_path / "metrics.csv").write_text(text)
    log = MetricsLog(tmp_path, start=2)
    with pytest.raises(Refusal, match=rf"{tmp_path / 'metrics.csv'} is not a file of metrics"):
        log.append({"step": 3, "loss": 0.5})
    log.close()


def test_fewer_steps_than_a_finished_run_trained_are_refused_before_exporting(tiny_run, tmp_path):
    import shutil

    from tests.test_run_faults import driver

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "ema.safetensors").read_bytes()
    result = driver(run, "--max-steps", "2", timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"{run / 'checkpoints' / 'step_0000003'} has trained 3 steps, more than train.steps=2")
    assert (run / "ema.safetensors").read_bytes() == before
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3


def test_python_m_promoe_convert_prints_no_runpy_warning():
    import promoe

    result = subprocess.run([sys.executable, "-m", "promoe.convert", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0 and "RuntimeWarning" not in result.stderr, result.stderr
    assert promoe.load_official_checkpoint.__module__ == "promoe.convert"


def test_a_resume_falls_back_from_a_checkpoint_whose_index_is_a_refused_pickle(two_checkpoints, tmp_path, capsys):
    import pickle

    from promoe.checkpoint_format import file_digest
    from tests.test_safe_loading import CreatesFile

    checkpoints, newest = two_checkpoints
    (newest / ".metadata").write_bytes(pickle.dumps(CreatesFile(tmp_path / "pwned")))
    manifest = json.loads((newest / "manifest.json").read_text())  # rewritten to match, as a forger would
    manifest["files"][".metadata"] = {"bytes": (newest / ".metadata").stat().st_size,
                                      "blake2b": file_digest(newest / ".metadata")}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoints.newest_intact() == newest.with_name("step_0000001")
    said = capsys.readouterr()
    assert "refused" in said.out and "Traceback" not in said.out + said.err
    assert not (tmp_path / "pwned").exists() and newest.with_name("step_0000002.damaged").is_dir()
