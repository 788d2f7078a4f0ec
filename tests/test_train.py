"""The training driver: config validation, resume after a kill, and 2 ranks agreeing with 1."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from promoe.sampling import load_model
from promoe.train_config import load_config
from promoe.training.optimizer import learning_rate
from tests.helpers import dit_reduction_lengths, reordered_steps_tolerance, torchrun

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["model.overrides.hidden_size=32", "model.overrides.num_heads=4", "model.overrides.depth=2",
            "train.global_batch=16", "train.log_every=1", "train.grid_steps=2",
            "train.fid_samples=0"]
# What the driver says after its first step with train.compile (`promoe.training.parallel.compile_counts`).
COMPILE_LINE = re.compile(r"torch\.compile, step \d+: (\d+) graphs from (\d+) frames, (\d+) graph breaks")


def reordered_run_tolerance(steps: int, *extra: str, banks_regrouped: bool = False) -> tuple[float, float]:
    """The tolerances of the tiny run (with `extra` settings) against itself with its sums taken in another order
    (other ranks, micro-batches, expert parallelism): the relative one of step `steps`'s loss and gradient norm, and
    the absolute one of the parameters after it.

    A step's sums are the model's forward and backward (dit_reduction_lengths) and the loss's mean over the batch;
    the gradient norm adds an expert bank's squares when the runs sum them rank by rank (banks_regrouped: expert
    parallelism). AdamW moves each
    parameter by lr * m / sqrt(v), a ratio of the gradient's moments: a relative error r of the gradient moves it by
    at most 2 r lr more or less, and those add up over the steps."""
    config = load_config(ROOT / "configs" / "demo.yaml", [*TINY_RUN, *extra])
    model, images = config.model_config(), config.train.global_batch
    sums = (*dit_reduction_lengths(model, images), images * model.in_channels * model.input_size**2)
    relative = [reordered_steps_tolerance(step, *sums) for step in range(1, steps + 1)]
    parameters = sum(2 * r * learning_rate(config.optim, step) for step, r in enumerate(relative, start=1))
    bank = (model.expert_spec.routed + model.expert_spec.uncond) * model.hidden_size * model.expert_hidden
    norm_sums = reordered_steps_tolerance(1, bank) if banks_regrouped else 0.0  # the norm's own, once
    return relative[-1] + norm_sums, parameters


def run(out, *extra, launcher=(sys.executable,), timeout=600, wait=True):
    command = [*launcher, str(ROOT / "train" / "run.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               "--out", str(out), *TINY_RUN, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs again the steps after its checkpoint)."""
    with open(Path(out) / "metrics.csv") as file:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(file)}


def test_unknown_key_wrong_type_and_bad_batch_are_reported_with_the_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'train.stepz' \(in .*bad.yaml\)"):
        load_config(config)
    config.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ValueError, match=r"optim.lr: expected float, got 'fast' \(in .*bad.yaml\)"):
        load_config(config)
    loaded = load_config(ROOT / "configs" / "demo.yaml", ["train.global_batch=15"])
    with pytest.raises(ValueError, match="not divisible by the world size 2"):
        loaded.validate(world_size=2, source="demo.yaml")
    loaded = load_config(ROOT / "configs" / "demo.yaml", ["model.overrides.experts=E8A9S1U1"])
    with pytest.raises(ValueError, match=r"model: .*must lie in"):
        loaded.validate(world_size=1, source="demo.yaml")


def test_overrides_reach_the_config():
    config = load_config(ROOT / "configs" / "demo.yaml", ["optim.lr=1e-3", "model.overrides.depth=2",
                                                          "optim.betas=[0.8, 0.9]"])
    assert config.optim.lr == 1e-3 and config.optim.betas == (0.8, 0.9)
    assert config.model.overrides["depth"] == 2 and config.model.overrides["patch_size"] == 4


def test_run_killed_mid_training_resumes_to_the_same_losses(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    run(uninterrupted, "--max-steps", "6", "--ckpt-every", "2")

    killed = tmp_path / "killed"
    process = run(killed, "--max-steps", "6", "--ckpt-every", "2", wait=False)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "latest").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / "checkpoints" / "latest").read_text() != "step_0000006"
    result = run(killed, "--max-steps", "6", "--ckpt-every", "2")
    assert "resumed from" in result.stdout
    expected, got = losses(uninterrupted), losses(killed)
    with open(killed / "metrics.csv") as file:  # the steps after the checkpoint were logged again, not twice
        assert [int(row["step"]) for row in csv.DictReader(file)] == list(range(1, 7))
    # The same run twice on this CPU differs in the last bits (threaded fp32 kernels), so not bit-identical.
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_two_ranks_give_the_same_losses_as_one(tmp_path):
    # RCL is a statistic of each rank's tokens (as in the official code), so it differs between 1 and 2 ranks
    # by design; with it off, every other term is a per-sample mean and must agree.
    no_rcl = "model.overrides.rcl_weight=0"
    run(tmp_path / "one", "--max-steps", "3", no_rcl)
    run(tmp_path / "two", "--max-steps", "3", no_rcl,
        launcher=torchrun())
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for step in one:  # each rank's GEMMs over half the rows, the gradients summed over the ranks: another order
        assert two[step] == pytest.approx(one[step], rel=reordered_run_tolerance(step, no_rcl)[0]), step


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    run(tmp_path, "--max-steps", "1")
    command = [sys.executable, str(ROOT / "train" / "run.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               "--out", str(tmp_path), *TINY_RUN, "model.overrides.depth=4", "--max-steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "was trained with model" in result.stderr


@pytest.mark.parametrize("first_ranks, then_ranks", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_a_run_resumes_on_another_number_of_ranks(tmp_path, first_ranks, then_ranks):
    """One fp32 process trains without FSDP2 (plain tensors), two ranks with it (DTensor shards): the checkpoint of
    either loads into the other."""
    no_rcl = "model.overrides.rcl_weight=0"
    launchers = {1: (sys.executable,), 2: torchrun()}
    run(tmp_path / "one", "--max-steps", "4", no_rcl)
    run(tmp_path / "moved", "--max-steps", "2", no_rcl, launcher=launchers[first_ranks])
    result = run(tmp_path / "moved", "--max-steps", "4", no_rcl, launcher=launchers[then_ranks])
    assert "resumed from" in result.stdout
    one, moved = losses(tmp_path / "one"), losses(tmp_path / "moved")
    assert sorted(moved) == [1, 2, 3, 4]
    for step in one:
        assert moved[step] == pytest.approx(one[step], rel=reordered_run_tolerance(step, no_rcl)[0]), step


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    run(tmp_path / "plain", "--max-steps", "3")
    run(tmp_path / "recomputed", "--max-steps", "3", "train.activation_checkpointing=true")
    plain, recomputed = losses(tmp_path / "plain"), losses(tmp_path / "recomputed")
    # Exact: the recomputation runs the same forward ops in the same order, and the backward is the same graph.
    assert recomputed == plain


@pytest.mark.slow  # two compiles of the tiny model: minutes on 2 cores
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_compiled_blocks_train_to_the_eager_losses_and_resume(tmp_path, checkpointing):
    recompute = f"train.activation_checkpointing={checkpointing}"  # compiled inside the checkpoint
    run(tmp_path / "eager", "--max-steps", "4", recompute)
    compiled = tmp_path / "compiled"
    said = run(compiled, "--max-steps", "2", "train.compile=true", recompute).stdout
    assert "torch.compile per block" in said
    graphs, _, breaks = map(int, COMPILE_LINE.search(said).groups())
    assert graphs >= 2 and breaks == 0, said  # both blocks, whole (with checkpointing, none was compiled before)
    # The checkpoint keeps the eager names (no `_orig_mod.`): load_model checks its index against a fresh model.
    load_model(compiled / "checkpoints" / "step_0000002", weights="model")
    assert "resumed from" in run(compiled, "--max-steps", "4", "train.compile=true", recompute).stdout
    eager, got = losses(tmp_path / "eager"), losses(compiled)
    # Inductor fuses the fp32 norms, softmax and GELU and may sum in another order: last-bit differences (1e-7
    # relative measured) that 4 steps of AdamW do not grow past 1e-5, the tolerance of runs repeated on this CPU.
    # A token whose two best experts tie to the last bit can take the other one, though: in one run the logged
    # expert loads showed one token of 784 moving from expert 5 to expert 1 at step 4, whose loss moved by 1.1e-4
    # (relative), and steps 5 and 6 agreed to 6e-7 again. One step may differ that much, no more.
    relative = {step: abs(got[step] - eager[step]) / abs(eager[step]) for step in eager}
    assert max(relative.values()) < 1e-3, relative
    assert sum(error > 1e-5 for error in relative.values()) <= 1, relative


def test_run_logs_expert_loads_and_leaves_plots_grid_and_export(tmp_path):
    run(tmp_path, "--max-steps", "2")
    with open(tmp_path / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    # Demo geometry at depth 2: block 1 is the MoE layer, its bank holds 6 routed + 1 unconditional experts.
    loads = [[float(row[f"load_b1_e{e}"]) for e in range(7)] for row in rows]
    for shares in loads:
        assert sum(shares) == pytest.approx(1.0, abs=1e-5) and min(shares) >= 0
    assert {"loss", "mse", "rcl", "lr", "grad_norm"} <= set(rows[0])
    for name in ("loss.png", "expert_load.png", "samples.png", "ema.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_activation_checkpointing_is_refused_for_routers_with_running_statistics(tmp_path):
    command = [sys.executable, str(ROOT / "train" / "run.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               "--out", str(tmp_path), *TINY_RUN, "model.name=DiffMoE-S", "model.overrides.experts=E4A1S0U0",
               "train.activation_checkpointing=true", "--max-steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "running statistics" in result.stderr


def test_a_run_trains_on_cached_latents_and_checks_their_shape(tmp_path):
    from promoe.data.preprocess import write_shard

    generator = torch.Generator().manual_seed(0)
    moments = torch.cat([torch.randn(16, 2, 4, 8, 8, generator=generator),
                         torch.rand(16, 2, 4, 8, 8, generator=generator) - 3], dim=2)
    (tmp_path / "latents").mkdir()
    write_shard(tmp_path / "latents" / "shard_00000.safetensors", moments, torch.arange(16) % 3,
                [f"c{i % 3}/{i}.png" for i in range(16)], 0, 64)
    latent_model = ["data.kind=latents", f"data.folder={tmp_path / 'latents'}", "model.overrides.in_channels=4",
                    "model.overrides.input_size=8", "model.overrides.patch_size=2", "model.overrides.num_classes=3"]
    run(tmp_path / "run", "--max-steps", "2", *latent_model)
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    assert not (tmp_path / "run" / "samples.png").exists()  # no VAE to decode a grid with
    command = [sys.executable, str(ROOT / "train" / "run.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               "--out", str(tmp_path / "bad"), *TINY_RUN, *latent_model, "model.overrides.input_size=16",
               "--max-steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "gives samples of shape (4, 8, 8), the model takes (4, 16, 16)" in result.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_validates_and_builds(path):
    import promoe

    config = load_config(path)
    config.validate(world_size=8 if path.name != "demo.yaml" else 1, source=str(path))
    model = promoe.build_model(config.model.name, device="meta", **config.model.overrides)
    if path.name != "demo.yaml":
        assert (model.config.input_size, model.in_channels, model.num_classes) == (32, 4, 1000)
        assert config.train.global_batch == 256 and config.optim.lr == 1e-4 and config.train.ema_decay == 0.9999
        assert config.train.objective == ("ddpm" if path.stem.endswith("_ddpm") else "rf")


def test_a_fashion_mnist_run_ends_with_its_fid_when_the_feature_net_exists(tmp_path):
    from promoe.eval.feature_net import FeatureNet, save_feature_net
    from tests.test_data import write_idx

    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("t10k", 40)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (count,), dtype=np.uint8))
    save_feature_net(FeatureNet(), tmp_path / "net.safetensors")  # untrained: the wiring is under test
    fid = ["train.fid_samples=30", f"train.feature_net={tmp_path / 'net.safetensors'}", f"data.folder={tmp_path}"]
    result = run(tmp_path / "run", "--max-steps", "1", *fid)
    assert "Fashion-MNIST FID (30 samples" in result.stdout and "NOT comparable with ImageNet FID" in result.stdout
    assert json.loads((tmp_path / "run" / "fid.json").read_text())["samples"] == 30
    result = run(tmp_path / "other", "--max-steps", "1", *fid[:1], f"train.feature_net={tmp_path / 'none'}",
                 f"data.folder={tmp_path}")
    assert "train its feature net first" in result.stdout


def test_bf16_training_keeps_the_timesteps_in_fp32(tmp_path):
    """In-process (one gloo rank): the root must not round s * 1000 to bf16, the blocks compute in bf16."""
    import torch.distributed as dist

    from promoe.training.parallel import build_on_meta, parallelise

    config = load_config(ROOT / "configs" / "demo.yaml", [*TINY_RUN, "train.precision=bf16"])
    seen = {}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = build_on_meta(config)
        parallelise(model, config, torch.device("cpu"))
        model.t_embedder.register_forward_pre_hook(lambda module, args: seen.update(t=args[0]))
        model.blocks[1].register_forward_hook(lambda module, args, output: seen.update(block=output[0]))
        t = torch.tensor([377.1, 901.3])
        prediction = model(torch.randn(2, 1, 28, 28), t, torch.tensor([1, 2]))
        prediction.float().square().mean().backward()
    finally:
        dist.destroy_process_group()
    assert seen["t"].dtype == torch.float32 and torch.equal(seen["t"], t)
    assert seen["block"].dtype == torch.bfloat16


def test_a_metrics_file_of_other_columns_is_refused_not_mixed(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,loss\n1,0.5\n")
    command = [sys.executable, str(ROOT / "train" / "run.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               "--out", str(tmp_path), *TINY_RUN, "--max-steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "has the columns ['step', 'loss']" in result.stderr
