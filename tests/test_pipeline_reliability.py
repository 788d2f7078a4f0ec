"""Pipeline folders as a hostile file or a careless call would have them (issue 32): a number of steps that would
lay out tables without end, a JSON file too deep or too large, a planted link or a concurrent writer at the folder
being saved, a model or a VAE larger than the memory free; each refused in one line before the work starts."""

import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from promoe.diffusion import RectifiedFlow  # noqa: E402
from promoe.errors import Refusal  # noqa: E402
from promoe.hf import ProMoEPipeline, ProMoETransformer2DModel, default_scheduler, save_pipeline  # noqa: E402
from promoe.hf_folder import load_transformer  # noqa: E402
from promoe.limits import MAX_SAMPLING_STEPS  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402


def tiny_pipeline() -> ProMoEPipeline:
    model = tiny_model("DiT-S")
    pipe = ProMoEPipeline(ProMoETransformer2DModel.from_dit(model), default_scheduler(RectifiedFlow(), model.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_ten_million_steps_are_refused_before_the_scheduler_lays_them_out(monkeypatch):
    pipe = tiny_pipeline()
    asked = []

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, timesteps=None):
        asked.append((num_inference_steps, sigmas, timesteps))

    monkeypatch.setattr(type(pipe.scheduler), "set_timesteps", set_timesteps)
    with pytest.raises(Refusal, match=rf"num_inference_steps 10000000: sampling takes 1..{MAX_SAMPLING_STEPS} steps"):
        pipe([1], num_inference_steps=10**7)
    with pytest.raises(Refusal, match=rf"sigmas of length {MAX_SAMPLING_STEPS + 1}: sampling takes"):
        pipe([1], sigmas=[1.0] * (MAX_SAMPLING_STEPS + 1))
    assert asked == []


@pytest.mark.parametrize("name", ["model_index.json", "transformer/config.json", "scheduler/scheduler_config.json"])
def test_a_pipeline_json_file_nested_too_deeply_or_too_large_is_refused_naming_it(tmp_path, name):
    save_pipeline(tiny_pipeline(), tmp_path / "pipe")
    path = tmp_path / "pipe" / name
    path.write_text("[" * 200_000 + "]" * 200_000)  # 400 KB, nested past the parser's recursion
    with pytest.raises(Refusal, match=rf"^{re.escape(str(path))} is not JSON \(nested deeper than"):
        ProMoEPipeline.from_pretrained(tmp_path / "pipe")
    path.write_text(json.dumps({"padding": "x" * (2 << 20)}))  # larger than any config: refused unread
    with pytest.raises(Refusal, match=rf"^{re.escape(str(path))} is larger than 1024 KiB"):
        ProMoEPipeline.from_pretrained(tmp_path / "pipe")


def test_saving_a_pipeline_writes_through_no_planted_link_and_takes_the_umasks_mode(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "pipe"
    (tmp_path / "pipe.tmp").symlink_to(victim)  # the fixed temporary name of before
    previous = os.umask(0o027)
    try:
        save_pipeline(tiny_pipeline(), out)
    finally:
        os.umask(previous)
    assert list(victim.iterdir()) == []
    assert not out.is_symlink() and (out / "model_index.json").is_file()
    assert out.stat().st_mode & 0o777 == 0o750
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o640
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pipe", "pipe.tmp", "victim"]


def test_a_pipeline_saved_onto_a_folder_another_writer_just_made_is_refused_leaving_nothing(tmp_path, monkeypatch):
    out = tmp_path / "pipe"
    pipe = tiny_pipeline()
    save = ProMoEPipeline.save_pretrained

    def another_writer_first(self, folder, **kwargs):
        save(self, folder, **kwargs)
        save(self, out)  # the other command renamed its whole folder to `out` meanwhile

    monkeypatch.setattr(ProMoEPipeline, "save_pretrained", another_writer_first)
    with pytest.raises(Refusal, match=rf"{re.escape(str(out))} exists \(written meanwhile"):
        save_pipeline(pipe, out)
    assert [path.name for path in tmp_path.iterdir()] == ["pipe"]


def test_a_transformer_larger_than_the_free_memory_is_refused_before_it_is_built(tmp_path, monkeypatch):
    import promoe.zoo

    save_pipeline(tiny_pipeline(), tmp_path / "pipe")
    built = []
    monkeypatch.setattr(promoe.hf_folder, "build_from_config", lambda config: built.append(config))
    monkeypatch.setattr(promoe.zoo, "available_memory", lambda: 1 << 10)
    config = tmp_path / "pipe" / "transformer" / "config.json"
    with pytest.raises(Refusal, match=rf"^{re.escape(str(config))}: the model takes .* this machine has 0.0 MiB free"):
        load_transformer(tmp_path / "pipe" / "transformer")
    with pytest.raises(Refusal, match="this machine has 0.0 MiB free"):
        ProMoEPipeline.from_pretrained(tmp_path / "pipe")
    assert built == []


def save_vae_config(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **fields}))
    return folder / "config.json"


@pytest.mark.parametrize("fields, refusal", [
    (dict(block_out_channels=[32, 32], layers_per_block=17), r"layers_per_block 17: each must be an integer in 1..16"),
    (dict(block_out_channels=[32] * 9), r"block_out_channels \[32, 32, .*\]: a list of 1..8 widths"),
    (dict(block_out_channels=[32, 0]), r"block_out_channels \[32, 0\]: each must be an integer in 1..4096"),
    (dict(block_out_channels=[32, 32], latent_channels=4.5), r"latent_channels 4.5: each must be an integer"),
])
def test_a_vae_config_out_of_bounds_is_refused_before_diffusers_builds_it(tmp_path, fields, refusal):
    from promoe.data.vae import load_vae

    config = save_vae_config(tmp_path / "vae", **fields)
    with pytest.raises(Refusal, match=rf"^{re.escape(str(config))}: {refusal}"):
        load_vae(tmp_path / "vae")


def test_a_vae_larger_than_the_free_memory_is_refused_before_diffusers_builds_it(tmp_path, monkeypatch):
    import promoe.data.vae
    from promoe.data.vae import load_vae

    config = save_vae_config(tmp_path / "vae", block_out_channels=[32, 64], layers_per_block=1)
    # 4 bytes x (36 x (32^2 + 64^2) x 2 + 80 x 64^2) = 2,785,280 bytes estimated
    monkeypatch.setattr(promoe.data.vae, "available_memory", lambda: 2_785_279)
    with pytest.raises(Refusal, match=rf"^{re.escape(str(config))}: a VAE of about 2.7 MiB of weights"):
        load_vae(tmp_path / "vae")

