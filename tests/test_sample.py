"""The sampling CLI: every checkpoint form, the evaluation npz, resumability, and 2 processes equal to 1."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from promoe.sample import checkpoint_label, draw_labels, main
from promoe.sampling import image_grid, load_model, objective_of
from tests.helpers import torchrun

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "3", "--num-images", "10", "--batch-size", "4"]


def samples(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(folder / "samples.npz")
    return data["arr_0"], data["arr_1"]


def test_checkpoint_folder_and_exported_ema_give_the_same_model(tiny_run):
    from_checkpoint, config = load_model(tiny_run / "checkpoints" / "step_0000003")
    exported, _ = load_model(tiny_run / "ema.safetensors")
    live, _ = load_model(tiny_run / "checkpoints" / "step_0000003", weights="model")
    assert config.model.name == "ProMoE-S" and config.data.kind == "pixels"
    ema_state, live_state = from_checkpoint.state_dict(), live.state_dict()
    for name, value in exported.state_dict().items():
        assert torch.equal(value, ema_state[name]), name
    # After 3 steps at decay 0.995 the EMA is still close to the initial weights, not to the trained ones.
    assert not torch.equal(ema_state["final_layer.linear.weight"], live_state["final_layer.linear.weight"])


def test_cli_writes_pngs_npz_grid_and_settings_per_scale(tiny_run, tmp_path):
    main(["--ckpt", str(tiny_run / "checkpoints" / "step_0000003"), "--weights", "model", "--cfg-scale", "1", "1.5",
          "--out", str(tmp_path), *FAST])
    for scale in ("1", "1.5"):
        folder = tmp_path / "step_0000003" / f"cfg-{scale}"
        images, labels = samples(folder)
        assert images.shape == (10, 28, 28, 1) and images.dtype == np.uint8 and labels.shape == (10,)
        names = sorted(p.name for p in folder.glob("0*.png"))
        assert names == [f"{i:06d}_class{label:04d}.png" for i, label in enumerate(labels)]
        assert (folder / "grid.png").exists() and '"cfg_scale": ' + scale in (folder / "sampling.json").read_text()
        assert images.std() > 0


def test_an_interrupted_run_redoes_only_the_missing_batch(tiny_run, tmp_path):
    main(["--ckpt", str(tiny_run / "ema.safetensors"), "--out", str(tmp_path), *FAST])
    folder = tmp_path / checkpoint_label(tiny_run / "ema.safetensors") / "cfg-1"
    before, _ = samples(folder)
    pngs = sorted(folder.glob("0*.png"))
    pngs[5].unlink()  # batch 1 (images 4..7) is incomplete
    untouched = {p: p.stat().st_mtime_ns for p in pngs if p != pngs[5]}
    main(["--ckpt", str(tiny_run / "ema.safetensors"), "--out", str(tmp_path), *FAST])
    changed = [p.name for p, mtime in untouched.items() if p.stat().st_mtime_ns != mtime]
    assert sorted(changed) == sorted(p.name for p in pngs[4:8] if p != pngs[5])
    after, _ = samples(folder)
    assert np.array_equal(before, after)


def test_two_processes_write_the_same_images_as_one(tiny_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    main(["--ckpt", str(tiny_run / "ema.safetensors"), "--out", str(one), *FAST])
    command = [*torchrun(), "-m", "promoe.sample", "--ckpt", str(tiny_run / "ema.safetensors"), "--out", str(two),
               *FAST]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    label = checkpoint_label(tiny_run / "ema.safetensors")
    pngs = sorted((one / label / "cfg-1").glob("0*.png"))
    assert len(pngs) == 10
    for png in pngs:
        assert png.read_bytes() == (two / label / "cfg-1" / png.name).read_bytes(), png.name


def test_given_labels_are_cycled_and_bad_ones_rejected():
    assert draw_labels(5, 10, [3, 7], seed=0).tolist() == [3, 7, 3, 7, 3]
    drawn = draw_labels(1000, 10, None, seed=1)
    assert torch.equal(drawn, draw_labels(1000, 10, None, seed=1)) and set(drawn.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="outside 0..9"):
        draw_labels(5, 10, [10], seed=0)


def test_grid_places_images_row_major():
    images = np.arange(5, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(3, 2)  # [5, 2, 3, 1]
    grid = image_grid(images, columns=2)
    assert grid.shape == (6, 6, 1)
    assert grid[0, 3, 0] == 1 and grid[2, 0, 0] == 2 and grid[4, 0, 0] == 4 and grid[4, 3, 0] == 0


def test_clear_errors_for_missing_inputs(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    official = tmp_path / "ckpt_step_1.pth"
    torch.save({}, official)
    with pytest.raises(ValueError, match="--model"):
        load_model(official)
    from safetensors.torch import load_file, save_file

    lonely = tmp_path / "ema.safetensors"  # an export of before configs travelled in the file's metadata
    save_file(load_file(tiny_run / "ema.safetensors"), lonely)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(lonely)
    latent = tmp_path / "latent"
    latent.mkdir()
    save_file(load_file(tiny_run / "ema.safetensors"), latent / "ema.safetensors")  # its config: the file beside
    config = (tiny_run / "config.json").read_text().replace('"kind": "pixels"', '"kind": "latents"')
    (latent / "config.json").write_text(config)
    with pytest.raises(SystemExit, match="give --vae PATH"):
        main(["--ckpt", str(latent / "ema.safetensors"), "--out", str(tmp_path / "s"), *FAST])


def test_a_folder_of_other_settings_or_two_checkpoints_of_one_name_are_refused(tiny_run, tmp_path):
    main(["--ckpt", str(tiny_run / "ema.safetensors"), "--out", str(tmp_path), *FAST])
    with pytest.raises(SystemExit, match="other settings .*steps"):
        main(["--ckpt", str(tiny_run / "ema.safetensors"), "--out", str(tmp_path), *FAST, "--steps", "4"])
    twin = tmp_path / "elsewhere" / tiny_run.name
    twin.mkdir(parents=True)
    (twin / "ema.safetensors").write_bytes((tiny_run / "ema.safetensors").read_bytes())
    with pytest.raises(SystemExit, match="same folder"):
        main(["--ckpt", str(tiny_run / "ema.safetensors"), str(twin / "ema.safetensors"), "--out", str(tmp_path)])


def test_the_objective_of_an_official_checkpoint_must_be_named_and_ema_exports_have_no_live_weights(tiny_run):
    with pytest.raises(ValueError, match="--objective"):
        objective_of(None, None)
    assert type(objective_of(None, "ddpm")).__name__ == "DDPM"
    with pytest.raises(ValueError, match="EMA weights only"):
        load_model(tiny_run / "ema.safetensors", weights="model")


def test_pixel_models_of_image_folders_are_not_taken_for_latent_ones():
    from promoe.sampling import is_latent_model
    from promoe.train_config import load_config

    def config(*overrides):
        return load_config(None, list(overrides))

    assert not is_latent_model(config("data.kind=pixels"))
    assert not is_latent_model(config("data.kind=images", "data.folder=x"))
    assert is_latent_model(config("data.kind=images", "data.folder=x", "data.vae=vae"))
    assert is_latent_model(config("data.kind=latents", "data.folder=x")) and is_latent_model(None)


def test_scheduler_and_guidance_are_recorded_and_an_unfitting_scheduler_is_refused_before_any_output(tiny_run,
                                                                                                     tmp_path):
    import json

    main(["--ckpt", str(tiny_run / "ema.safetensors"), "--out", str(tmp_path), "--cfg-scale", "2", *FAST,
          "--scheduler", "flow-heun", "--guidance", "two-pass"])
    folder = tmp_path / checkpoint_label(tiny_run / "ema.safetensors") / "cfg-2"
    settings = json.loads((folder / "sampling.json").read_text())
    assert (settings["sampler"], settings["guidance"], settings["objective"]) == ("flow-heun", "two-pass", "rf")
    assert samples(folder)[0].shape == (10, 28, 28, 1)
    with pytest.raises(SystemExit, match="choose one of flow-euler, flow-heun"):
        main(["--ckpt", str(tiny_run / "ema.safetensors"), "--out", str(tmp_path / "ddim"), *FAST,
              "--scheduler", "ddim"])
    assert not (tmp_path / "ddim").exists()
    main(["--ckpt", str(tiny_run / "ema.safetensors"), "--out", str(tmp_path / "auto"), *FAST])
    auto = json.loads((tmp_path / "auto" / folder.parent.name / "cfg-1" / "sampling.json").read_text())
    assert (auto["sampler"], auto["guidance"]) == ("euler", "batched")  # ProMoE's routing does not couple samples


@pytest.mark.slow  # a compile of the tiny model: minutes on 2 cores
def test_compiled_sampling_gives_the_images_of_eager_sampling(tiny_run, tmp_path):
    # A process of its own: the compile stops Dynamo tracing fp32 `_grouped_mm` for the whole process.
    command = [sys.executable, "-m", "promoe.sample", "--ckpt", str(tiny_run / "ema.safetensors"), *FAST]
    for variant, extra in (("eager", []), ("compiled", ["--compile"])):
        subprocess.run([*command, "--out", str(tmp_path / variant), *extra], check=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    label = checkpoint_label(tiny_run / "ema.safetensors")
    eager, eager_labels = samples(tmp_path / "eager" / label / "cfg-1")
    compiled, compiled_labels = samples(tmp_path / "compiled" / label / "cfg-1")
    assert np.array_equal(eager_labels, compiled_labels)
    # Compiled fp32 differs from eager in the last bits, which can move a pixel across a rounding boundary of uint8:
    # at most one level.
    assert np.abs(eager.astype(int) - compiled.astype(int)).max() <= 1
