"""Our refusals are one exception type, `promoe.errors.Refusal` (issue 34): the commands say it and the file
system's errors in one line, and a bug's exception (a plain ValueError deep in a training step) keeps its traceback.
Verdicts every rank reaches alike are said by rank 0 alone; a rank left waiting for a hung peer gives up after the
process group's timeout (issue 32)."""

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from promoe.errors import Refusal, exits_with_message
from promoe.training.ranks import AllRanksStop
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def command_raising(error: BaseException):
    @exits_with_message
    def main():
        raise error
    return main


@pytest.mark.parametrize("error, line", [
    (Refusal("run.yaml: train.steps -1 must be >= 1"), "error: run.yaml: train.steps -1 must be >= 1"),
    (FileNotFoundError("/data/x is missing: it holds the latents"), "error: /data/x is missing: it holds the latents"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/a/loss.png"),
     "error: /runs/a/loss.png: No space left on device: the disk is full; free space there, then run the same "
     "command again"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs"),
     "error: /runs: Permission denied: a read-only or someone else's folder? Change its permissions or choose "
     "another path"),
])
def test_refusals_and_file_system_errors_end_a_command_in_one_line(error, line):
    with pytest.raises(SystemExit) as stop:
        command_raising(error)()
    assert stop.value.code == line


@pytest.mark.parametrize("error", [
    ValueError("math domain error"),  # a bug's ValueError: not ours to say in one line
    OSError("no errno: a library's or a bug's"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    KeyError("dit.blocks.0"),
], ids=["ValueError", "OSError", "ConnectionResetError", "KeyError"])
def test_any_other_error_of_a_command_keeps_its_traceback(error):
    with pytest.raises(type(error)):
        command_raising(error)()


STEP_WITH_A_BUG = textwrap.dedent("""
    import sys
    import promoe.diffusion.rectified_flow as rectified_flow
    from train.run import main

    def loss(*args, **kwargs):
        raise ValueError("a bug deep in a training step")

    rectified_flow.RectifiedFlow.loss = loss
    sys.exit(main(sys.argv[1:]))
""")


def test_a_plain_value_error_inside_a_training_step_keeps_its_traceback(tmp_path):
    script = tmp_path / "step_with_a_bug.py"
    script.write_text(STEP_WITH_A_BUG)
    command = [sys.executable, str(script), "--config", str(ROOT / "configs" / "demo.yaml"), "--out",
               str(tmp_path / "run"), "--max-steps", "1", "model.overrides.hidden_size=32",
               "model.overrides.num_heads=4", "model.overrides.depth=2", "train.global_batch=16"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(free_port())})
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].endswith("ValueError: a bug deep in a training step")
    assert "error: a bug" not in result.stderr


def test_the_activation_checkpointing_and_expert_parallel_verdicts_are_said_by_rank_0_alone():
    from promoe.train_config import load_config
    from promoe.training.expert_parallel import apply_expert_parallel
    from promoe.training.parallel import apply_activation_checkpointing, build_on_meta

    tiny = ["model.overrides.hidden_size=32", "model.overrides.num_heads=4", "model.overrides.depth=2"]
    config = load_config(ROOT / "configs" / "demo.yaml", [*tiny, "model.name=DiffMoE-S",
                                                          "model.overrides.experts=E4A1S0U0",
                                                          "train.activation_checkpointing=true"])
    with pytest.raises(AllRanksStop, match="train.activation_checkpointing: the router of DiffMoE-S updates"):
        apply_activation_checkpointing(build_on_meta(config), config)
    config = load_config(ROOT / "configs" / "demo.yaml", [*tiny, "model.name=EC-DiT-S",
                                                          "model.overrides.experts=E4A1S0U0",
                                                          "train.expert_parallel=2"])
    with pytest.raises(AllRanksStop, match="train.expert_parallel=2: EC-DiT-S routes by expert choice"):
        apply_expert_parallel(build_on_meta(config), config, "cpu")


def test_expert_banks_whose_widths_the_replicas_do_not_divide_are_refused_with_the_widths():
    """FSDP2 shards a bank's dim 1 evenly only: widths 36 and 144 over 8 replicas are refused, over 4 taken."""
    from promoe.moe.layer import moe_layers
    from promoe.train_config import load_config
    from promoe.training.expert_parallel import bank_width_refusal
    from promoe.training.parallel import build_on_meta

    config = load_config(ROOT / "configs" / "demo.yaml", ["model.overrides.hidden_size=36",
                                                          "model.overrides.num_heads=4", "model.overrides.depth=2"])
    layers = moe_layers(build_on_meta(config))
    hidden = layers[0].experts.w_up_EDH.shape[2]
    assert bank_width_refusal(layers, "ProMoE-S", 8) == (
        f"the experts' widths [36, {hidden}] of ProMoE-S must divide by the 8 ranks that hold each share (world "
        "size / expert_parallel), over which their banks are sharded on that dim")
    assert bank_width_refusal(layers, "ProMoE-S", 4) is None


HUNG_PEER = textwrap.dedent("""
    import time
    import torch.distributed as dist
    from promoe.distributed import init_distributed
    from promoe.errors import said_in_one_line
    from promoe.training.ranks import said_once

    init_distributed()
    with said_once(), said_in_one_line():
        if dist.get_rank() == 1:
            time.sleep(3600)  # alive, but never joins the collective
        dist.barrier()
""")


def test_a_rank_waiting_for_a_hung_peer_gives_up_after_the_collective_timeout(tmp_path):
    script = tmp_path / "hung_peer.py"
    script.write_text(HUNG_PEER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PROMOE_COLLECTIVE_TIMEOUT": "2"}
    ranks = [subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    try:
        said = ranks[0].communicate(timeout=300)[1]  # without the timeout, rank 0 would wait for 30 minutes
    finally:
        for rank in ranks:
            rank.kill()
            rank.communicate()
    assert ranks[0].returncode == 1 and "Traceback" not in said, said
    assert said.splitlines()[-1] == ("error (rank 0 of 2): the other ranks did not join a collective within 2 s: one "
                                     "hangs, or died without a message (see its output); "
                                     "PROMOE_COLLECTIVE_TIMEOUT=<seconds> sets this wait")


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_collective_timeout_that_is_no_number_of_seconds_is_refused(monkeypatch, value):
    from promoe.distributed import collective_timeout

    monkeypatch.setenv("PROMOE_COLLECTIVE_TIMEOUT", value)
    with pytest.raises(Refusal, match=f"PROMOE_COLLECTIVE_TIMEOUT='{value}': give the seconds"):
        collective_timeout()
