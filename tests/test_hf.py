"""promoe in diffusers' terms (promoe.hf): every zoo model round-trips through save_pretrained / from_pretrained, the
pipeline gives the sampling CLI's images to the last uint8 level, conversion both ways, and clear errors. Every
model and VAE is built here: nothing is downloaded."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from promoe.convert import main as convert  # noqa: E402
from promoe.diffusion import DDPM, RectifiedFlow, euler_sigmas, make_scheduler  # noqa: E402
from promoe.hf import ProMoEPipeline, ProMoETransformer2DModel, default_scheduler, save_pipeline  # noqa: E402
from promoe.moe.experts import ExpertBank  # noqa: E402
from promoe.sample import main as sample  # noqa: E402
from promoe.sampling import generate, initial_noise  # noqa: E402
from tests.helpers import save_tiny_vae, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# One of each router family (ProMoE's prototypes, TC-DiT's and EC-DiT's linear gates, DiffMoE's capacity predictor
# and threshold buffers, Dense-DiT), some with fields off their defaults.
ZOO = {
    "ProMoE-S": dict(experts="E6A2S1U1", qk_norm=True),
    "ProMoE-EC-S": dict(experts="E6A1S1U1", capacity_factor=2.0),
    "TC-DiT-S": dict(experts="E4A1S0U0"),
    "EC-DiT-S": dict(experts="E4A1S0U0"),
    "DiffMoE-S": dict(experts="E4A1S0U0", capacity_predictor_loss_weight=0.01),
    "DiT-S": dict(),
}
OBJECTIVES = {"rf": (RectifiedFlow(), False), "ddpm": (DDPM(), True)}  # objective, learn_sigma


def quiet(pipe: ProMoEPipeline) -> ProMoEPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_of(model, objective, vae=None) -> ProMoEPipeline:
    return quiet(ProMoEPipeline(ProMoETransformer2DModel.from_dit(model), default_scheduler(objective, model.config),
                                vae))


def user_fields(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def user_config(component) -> dict:
    return {k: v for k, v in component.config.items() if not k.startswith("_")}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_and_its_pipeline_round_trip_bit_identical(name, objective, tmp_path):
    flow, learn_sigma = OBJECTIVES[objective]
    model = tiny_model(name, learn_sigma=learn_sigma, **ZOO[name]).eval()
    if name.startswith("DiffMoE"):  # its thresholds are buffers: make them matter too
        for block in model.blocks[1::2]:
            block.mlp.router.expert_threshold_E.uniform_()
    transformer = ProMoETransformer2DModel.from_dit(model, objective)
    transformer.save_pretrained(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert user_fields(tmp_path / "t" / "config.json") == {**dataclasses.asdict(model.config), "objective": objective}
    loaded = ProMoETransformer2DModel.from_pretrained(tmp_path / "t")
    assert loaded.dit.config == model.config and loaded.objective == objective
    assert_same_tensors(dict(loaded.dit.state_dict(keep_vars=False)), model.state_dict())
    assert torch.equal(loaded.dit.pos_embed, model.pos_embed)  # not saved: rebuilt from the config

    pipe = pipeline_of(model, flow)
    pipe.save_pretrained(tmp_path / "p")
    again = ProMoEPipeline.from_pretrained(tmp_path / "p")
    assert again.vae is None and again.transformer.dit.config == model.config
    assert_same_tensors(again.transformer.state_dict(), transformer.state_dict())
    assert user_config(again.scheduler) == user_config(pipe.scheduler)
    assert type(again.scheduler).__name__ == ("DDPMScheduler" if objective == "ddpm" else
                                              "FlowMatchEulerDiscreteScheduler")
    if objective == "ddpm":
        assert again.scheduler.config.variance_type == "learned_range"  # the model has variance channels


def test_the_diffusers_model_holds_the_dit_itself_and_speaks_diffusers_convention():
    model = tiny_model("ProMoE-S").eval()
    transformer = ProMoETransformer2DModel.from_dit(model)
    assert transformer.dit is model
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(transformer.parameters(), model.parameters()))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 999.0]), torch.tensor([1, 10, 3])
    expected = model(x, t, y)
    out = transformer(hidden_states=x, timestep=t, class_labels=y)
    assert torch.equal(out.sample, expected)
    (sample,) = transformer(x, t, y, return_dict=False)
    assert torch.equal(sample, expected)
    assert torch.equal(transformer(x, 250.0, y).sample, model(x, torch.full((3,), 250.0), y))  # a number broadcasts


@pytest.fixture(scope="module")
def pixel_pipeline(tiny_run, tmp_path_factory) -> Path:
    """The tiny demo run's EMA export converted with `python -m promoe.convert --to diffusers`."""
    out = tmp_path_factory.mktemp("pixel") / "pipe"
    convert([str(tiny_run / "ema.safetensors"), "--to", "diffusers", "--out", str(out)])
    return out


CLI = ["--labels", "3", "1", "4", "--num-images", "6", "--batch-size", "3", "--seed", "2", "--steps", "3",
       "--cfg-scale", "2.5"]


def cli_images(source: Path, out: Path, *extra: str) -> np.ndarray:
    sample(["--ckpt", str(source), "--out", str(out), *CLI, *extra])
    (folder,) = out.glob("*/cfg-2.5")
    return np.load(folder / "samples.npz")["arr_0"]


def pipeline_images(pipe: ProMoEPipeline, **call) -> np.ndarray:
    """The CLI's two batches of 3 (labels 3 1 4 cycled), batch b from a generator seeded with 2 * 1_000_003 + b."""
    batches = []
    for batch in range(2):
        generator = torch.Generator().manual_seed(2 * 1_000_003 + batch)
        images = pipe(class_labels=[3, 1, 4], guidance_scale=2.5, num_inference_steps=3, generator=generator,
                      **call).images
        batches.append(np.stack([np.asarray(image) for image in images]))
    return np.concatenate(batches)[..., None]  # one channel: PIL mode L


@pytest.mark.parametrize("sampler", ["euler", "flow-euler"])
def test_the_pipeline_gives_the_cli_images_to_the_last_uint8_level(pixel_pipeline, tiny_run, sampler, tmp_path):
    pipe = quiet(ProMoEPipeline.from_pretrained(pixel_pipeline))
    assert pipe.vae is None  # the demo's model makes pixels
    extra = ["--scheduler", "flow-euler"] if sampler == "flow-euler" else []
    expected = cli_images(tiny_run / "ema.safetensors", tmp_path / "cli", *extra)
    call = dict(sigmas=euler_sigmas(3)[:-1].tolist()) if sampler == "euler" else {}
    images = pipeline_images(pipe, **call)
    assert images.dtype == np.uint8 and images.shape == expected.shape == (6, 28, 28, 1)
    assert images.std() > 0 and np.array_equal(images, expected)
    # The sampler reads the pipeline folder itself (without diffusers: promoe.hf_folder) into the same images.
    assert np.array_equal(cli_images(pixel_pipeline, tmp_path / "from-folder", *extra), expected)
    settings = json.loads(next((tmp_path / "from-folder").glob("*/cfg-2.5/sampling.json")).read_text())
    assert (settings["objective"], settings["vae"]) == ("rf", None)


def test_outputs_in_every_type_are_one_sample(pixel_pipeline):
    pipe = quiet(ProMoEPipeline.from_pretrained(pixel_pipeline))

    def run(output_type):
        return pipe([0, 9], guidance_scale=1.5, num_inference_steps=2, generator=torch.manual_seed(5),
                    output_type=output_type, return_dict=False)[0]

    latent, pt, np_images, pil = run("latent"), run("pt"), run("np"), run("pil")
    assert latent.shape == (2, 1, 28, 28) and pt.shape == (2, 1, 28, 28) and np_images.shape == (2, 28, 28, 1)
    torch.testing.assert_close(pt, (latent.clamp(-1, 1) + 1) / 2)
    assert np.array_equal(np_images, pt.permute(0, 2, 3, 1).numpy())
    assert np.abs(np.stack([np.asarray(p) for p in pil]) / 255 - np_images[..., 0]).max() <= 0.5 / 255 + 1e-6


def test_the_pipeline_shows_diffusers_progress_bar(pixel_pipeline, monkeypatch):
    pipe = ProMoEPipeline.from_pretrained(pixel_pipeline)
    seen = []
    original = pipe.progress_bar
    monkeypatch.setattr(pipe, "progress_bar", lambda iterable: seen.append(len(iterable)) or original(iterable))
    pipe.set_progress_bar_config(disable=True)
    pipe([1], num_inference_steps=4, generator=torch.manual_seed(0))
    assert seen == [4]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), sample_size=64)


def latent_checkpoint(folder: Path, model) -> Path:
    """A safetensors export of a latent (DDPM or RF) model, as a run on cached latents writes it."""
    from promoe.train_config import load_config
    from promoe.weights import save_weights

    config = load_config(None, ["data.kind=latents", "data.folder=latents", "train.objective=ddpm"])
    config.model.resolved = model.config
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / "ema.safetensors", model.state_dict(), model.config, config)
    return folder / "ema.safetensors"


def test_a_latent_ddpm_model_converts_with_its_vae_and_samples_as_the_cli(vae_dir, tmp_path):
    model = tiny_model("DiffMoE-S", experts="E4A1S0U0", learn_sigma=True)  # DiffMoE: guidance in two passes
    source = latent_checkpoint(tmp_path / "run", model)
    with pytest.raises(SystemExit, match="give --vae"):
        convert([str(source), "--to", "diffusers", "--out", str(tmp_path / "nope")])
    convert([str(source), "--to", "diffusers", "--out", str(tmp_path / "pipe"), "--vae", str(vae_dir)])
    assert not (tmp_path / "nope").exists() and (tmp_path / "pipe" / "vae" / "config.json").is_file()
    pipe = quiet(ProMoEPipeline.from_pretrained(tmp_path / "pipe"))
    assert (type(pipe.scheduler).__name__, pipe.scheduler.config.variance_type) == ("DDPMScheduler", "learned_range")
    ddim = make_scheduler("ddim", DDPM(), 3)
    pipe.scheduler = type(ddim).from_config(ddim.config)  # as a diffusers user swaps schedulers
    sample(["--ckpt", str(source), "--vae", str(vae_dir), "--out", str(tmp_path / "cli"), "--labels", "2", "7",
            "--num-images", "2", "--batch-size", "2", "--steps", "3", "--cfg-scale", "3", "--scheduler", "ddim"])
    expected = np.load(next((tmp_path / "cli").glob("*/cfg-3/samples.npz")))["arr_0"]
    images = pipe([2, 7], guidance_scale=3.0, num_inference_steps=3, generator=torch.manual_seed(0)).images
    assert expected.shape == (2, 64, 64, 3) and np.array_equal(np.stack([np.asarray(i) for i in images]), expected)
    # The sampler decodes a pipeline folder's latents with the folder's own VAE.
    sample(["--ckpt", str(tmp_path / "pipe"), "--out", str(tmp_path / "from-folder"), "--labels", "2", "7",
            "--num-images", "2", "--batch-size", "2", "--steps", "3", "--cfg-scale", "3", "--scheduler", "ddim"])
    folder = tmp_path / "from-folder" / "pipe" / "cfg-3"
    assert np.array_equal(np.load(folder / "samples.npz")["arr_0"], expected)
    settings = json.loads((folder / "sampling.json").read_text())
    assert (settings["objective"], settings["vae"]) == ("ddpm", str(tmp_path / "pipe" / "vae"))


def test_a_checkpoint_folder_converts_to_a_pipeline_of_its_ema_weights(tiny_run, tmp_path):
    from promoe.sampling import load_model

    step = tiny_run / "checkpoints" / "step_0000003"
    convert([str(step), "--to", "diffusers", "--out", str(tmp_path / "p")])
    ema, _ = load_model(step)
    pipe = ProMoEPipeline.from_pretrained(tmp_path / "p")
    assert_same_tensors(pipe.transformer.dit.state_dict(), ema.state_dict())
    with pytest.raises(SystemExit, match="exists"):
        convert([str(step), "--to", "diffusers", "--out", str(tmp_path / "p")])


def test_ddpm_scheduler_with_the_learned_variance_is_our_ancestral_sampler():
    # Same noise, same respaced timesteps: our float64 chain and diffusers' float32 one agree to float32 rounding
    # (1.5e-5 measured); the fixed variance instead of the learned one is far off (checked below).
    model = tiny_model("ProMoE-S", learn_sigma=True).eval()
    with torch.no_grad():  # weights of std 0.05: variance outputs within [-1, 1] (far outside, exp amplifies rounding)
        for param in model.parameters():
            param.mul_(1 / 6)
    y = torch.tensor([1, 2, 3])
    ddpm = DDPM()
    pipe = pipeline_of(model, ddpm)
    timesteps = ddpm.respaced(5).timesteps.flip(0).tolist()  # our respacing, 999 .. 0
    theirs = pipe(y, guidance_scale=2.0, timesteps=timesteps, generator=torch.manual_seed(4),
                  output_type="latent").images
    generator = torch.manual_seed(4)  # the pipeline draws the steps' noise after the initial noise, from one generator
    ours = ddpm.sample(model, initial_noise(model, 3, generator), y, 5, 2.0, generator=generator)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    fixed = pipeline_of(model, DDPM(variance="fixed"))
    assert fixed.scheduler.config.variance_type == "fixed_small"
    other = fixed(y, guidance_scale=2.0, timesteps=timesteps, generator=torch.manual_seed(4), output_type="latent")
    assert (other.images - ours).abs().max() > 1e-2


def test_an_official_checkpoint_converts_to_a_pipeline(vae_dir, tmp_path):
    from promoe.convert import load_official_checkpoint, promoe_to_official

    model = tiny_model("DiT-S", input_size=32, hidden_size=384, num_heads=6, depth=12, num_classes=1000)  # the zoo's
    official = tmp_path / "ckpt_step_1.pth"
    torch.save({"ema_model_state_dict": promoe_to_official(model)}, official)
    command = [str(official), "--to", "diffusers", "--model", "DiT-S", "--out", str(tmp_path / "p")]
    with pytest.raises(SystemExit, match="give --vae"):  # an official model makes latents
        convert([*command, "--objective", "rf"])
    with pytest.raises(SystemExit, match="--objective"):  # an official checkpoint does not say
        convert([*command, "--vae", str(vae_dir)])
    convert([*command, "--vae", str(vae_dir), "--objective", "ddpm"])
    pipe = ProMoEPipeline.from_pretrained(tmp_path / "p")
    assert pipe.scheduler.config.variance_type == "learned_range" and pipe.vae is not None
    assert_same_tensors(pipe.transformer.dit.state_dict(), load_official_checkpoint(official, "DiT-S").state_dict())


def test_bad_calls_and_folders_get_clear_errors(pixel_pipeline, tmp_path):
    pipe = quiet(ProMoEPipeline.from_pretrained(pixel_pipeline))
    for labels in ([10], [-1], [0, 12]):
        with pytest.raises(ValueError, match=r"class_labels \[.*\] outside 0..9"):
            pipe(labels, num_inference_steps=1)
    with pytest.raises(ValueError, match="integers"):
        pipe([0.5], num_inference_steps=1)
    for scale in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 1"):
            pipe([1], guidance_scale=scale, num_inference_steps=1)
    with pytest.raises(ValueError, match="one CPU torch.Generator"):
        pipe([1, 2], generator=[torch.manual_seed(0), torch.manual_seed(1)], num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], output_type="jpg", num_inference_steps=1)

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ProMoEPipeline.from_pretrained("facebook/DiT-XL-2-256")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ProMoETransformer2DModel.from_pretrained("facebook/DiT-XL-2-256", subfolder="transformer")
    other = tmp_path / "dit"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": [
        "diffusers", "DiTTransformer2DModel"], "scheduler": ["diffusers", "KarrasDiffusionSchedulers"]}))
    with pytest.raises(ValueError, match="not a promoe pipeline .*DiTPipeline"):
        ProMoEPipeline.from_pretrained(other)
    with pytest.raises(SystemExit, match="not a promoe pipeline"):
        sample(["--ckpt", str(other), "--out", str(tmp_path / "s")])
    index = json.loads((pixel_pipeline / "model_index.json").read_text())
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "model_index.json").write_text(json.dumps({**index, "transformer": ["os", "system"]}))
    with pytest.raises(ValueError, match="transformer \\['os', 'system'\\]"):
        ProMoEPipeline.from_pretrained(renamed)
    config = json.loads((pixel_pipeline / "transformer" / "config.json").read_text())
    bad = tmp_path / "bad"
    save_pipeline(pipe, bad)
    (bad / "transformer" / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(ValueError, match="does not fit .*missing key 'dit.blocks.2"):
        ProMoEPipeline.from_pretrained(bad)
    # A config that asks for a huge model is refused on `meta`, before anything is allocated (or takes long).
    for huge in ({"depth": 10**6}, {"hidden_size": 10**9, "num_heads": 4}):
        (bad / "transformer" / "config.json").write_text(json.dumps({**config, **huge}))
        with pytest.raises(ValueError, match="does not fit|cannot be built|must be at most"):
            ProMoEPipeline.from_pretrained(bad)
        with pytest.raises(SystemExit, match="does not fit|cannot be built|must be at most"):
            sample(["--ckpt", str(bad), "--out", str(tmp_path / "huge"), "--num-images", "1"])
    (bad / "transformer" / "config.json").write_text(json.dumps({**config, "wings": 2}))
    with pytest.raises(ValueError, match="unknown field.*wings"):
        ProMoETransformer2DModel.from_pretrained(bad / "transformer")
    with pytest.raises(ValueError, match="exists"):
        save_pipeline(pipe, bad)


def test_sampling_and_reading_pipeline_folders_import_no_diffusers(pixel_pipeline):
    code = ("import sys; sys.modules['diffusers'] = None\n"  # any import of diffusers now fails
            "import promoe.sample, promoe.convert, promoe.sampling, promoe.data.latents\n"
            "sys.path.insert(0, 'train'); import run  # the training driver\n"
            f"model, config = promoe.sampling.load_model({str(pixel_pipeline)!r})\n"
            "assert config.train.objective == 'rf' and config.data.kind == 'pixels', config\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("sampler", ["euler", "flow-euler", "flow-heun", "ddim", "dpm-solver++"])
def test_the_pipeline_runs_what_the_cli_runs_with_every_sampler(sampler):
    # generate() is what promoe.sample runs per batch; the pipeline holds the scheduler the CLI builds.
    objective = DDPM() if sampler in ("ddim", "dpm-solver++") else RectifiedFlow()
    model = tiny_model("ProMoE-S", learn_sigma=isinstance(objective, DDPM)).eval()
    labels = torch.tensor([4, 4, 8])
    scheduler = None if sampler == "euler" else sampler
    ours = generate(model, objective, labels, torch.manual_seed(11), 3, 2.0, scheduler=scheduler)
    pipe = pipeline_of(model, objective)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, objective, 3)
    call = dict(sigmas=euler_sigmas(3)[:-1].tolist()) if sampler == "euler" else {}
    theirs = pipe(labels, guidance_scale=2.0, num_inference_steps=3, generator=torch.manual_seed(11),
                  output_type="latent", **call).images
    assert torch.equal(theirs, ours)


# -- diffusers' conventions in full (issue 31) and the pipeline folders' digests (issue 32) --

LAYOUTS = {  # save_pretrained's arguments -> from_pretrained's
    "variant": (dict(variant="fp16"), dict(variant="fp16", torch_dtype=torch.float16)),
    "shards": (dict(max_shard_size="10KB"), {}),
    "shards-of-a-variant": (dict(max_shard_size="10KB", variant="fp16"),
                            dict(variant="fp16", torch_dtype=torch.float16)),
    "bin": (dict(safe_serialization=False), {}),
}


def model_inputs(model, batch: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.config.input_size, model.config.input_size, generator=generator)
    return x, torch.rand(batch, generator=generator) * 999, torch.randint(0, model.num_classes, (batch,),
                                                                          generator=generator)


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def damage(path: Path, byte: int = 0xFF) -> None:
    """`byte` written over every byte of every tensor of a safetensors file (its header kept)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = bytes([byte]) * (len(data) - start)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_diffusers_writes_loads_bit_identical(layout, tmp_path):
    from safetensors import safe_open

    from promoe.weights import TENSORS_DIGEST

    save, load = LAYOUTS[layout]
    model = tiny_model("ProMoE-S", learn_sigma=True).eval()
    if "variant" in save:
        model = model.half()  # what a user saves as the fp16 variant
    pipe = pipeline_of(model, DDPM())
    pipe.transformer.save_pretrained(tmp_path / "t", **save)
    pipe.save_pretrained(tmp_path / "p", **save)
    for folder in (tmp_path / "t", tmp_path / "p" / "transformer"):
        if save.get("safe_serialization", True):
            indexes = list(folder.glob("*.index*.json"))
            shards = set(json.loads(indexes[0].read_text())["weight_map"].values()) if indexes else {"one"}
            assert len(safetensors_files(folder)) == len(shards) > (1 if "max_shard_size" in save else 0)
            for file in safetensors_files(folder):  # each file records the digest of its own tensors
                with safe_open(str(file), framework="pt") as opened:
                    assert TENSORS_DIGEST in opened.metadata()
    loaded = ProMoETransformer2DModel.from_pretrained(tmp_path / "t", **load)
    again = ProMoEPipeline.from_pretrained(tmp_path / "p", **load)
    assert_same_tensors(loaded.dit.state_dict(), model.state_dict())
    assert_same_tensors(again.transformer.dit.state_dict(), model.state_dict())
    assert loaded.objective == again.transformer.objective == "ddpm"


def test_the_sampler_reads_a_sharded_pipeline_folder_as_the_pipeline_does(tmp_path):
    from promoe.sampling import load_model

    model = tiny_model("TC-DiT-S", experts="E4A1S0U0").eval()
    pipeline_of(model, RectifiedFlow()).save_pretrained(tmp_path / "p", max_shard_size="10KB")
    loaded, config = load_model(tmp_path / "p")  # without diffusers: promoe.hf_folder
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    assert config.train.objective == "rf"


def test_a_layout_whose_shapes_do_not_fit_is_refused_before_anything_is_built(tmp_path):
    model = tiny_model("ProMoE-S")
    transformer = ProMoETransformer2DModel.from_dit(model, "rf")
    for name, save in (("shards", dict(max_shard_size="10KB")), ("bin", dict(safe_serialization=False))):
        transformer.save_pretrained(tmp_path / name, **save)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "hidden_size": 10**9, "num_heads": 4}))
        with pytest.raises(ValueError, match="does not fit|cannot be built|must be at most"):
            ProMoETransformer2DModel.from_pretrained(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(config))  # a fitting config: only the index is wrong
    index = next((tmp_path / "shards").glob("*.index.json"))
    values = json.loads(index.read_text())
    values["weight_map"] = {key: "../elsewhere.safetensors" for key in values["weight_map"]}
    index.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="not a file of"):
        ProMoETransformer2DModel.from_pretrained(tmp_path / "shards")
    index.write_text("[" * 200_000 + "]" * 200_000)  # nested past the JSON parser's recursion
    with pytest.raises(ValueError, match="nested deeper than"):
        ProMoETransformer2DModel.from_pretrained(tmp_path / "shards")


def test_damaged_pipeline_weights_are_refused_in_one_line(vae_dir, tmp_path):
    from diffusers import AutoencoderKL

    model = tiny_model("ProMoE-S", learn_sigma=True).eval()
    pipe = pipeline_of(model, DDPM(), AutoencoderKL.from_pretrained(vae_dir))
    pipe.save_pretrained(tmp_path / "p")
    pipe.transformer.half().save_pretrained(tmp_path / "p" / "transformer", variant="fp16")
    pipe.transformer.float()
    # 0xff over every tensor of the main file: refused by the pipeline and by the sampler, naming the file.
    main = tmp_path / "p" / "transformer" / "diffusion_pytorch_model.safetensors"
    intact = main.read_bytes()
    damage(main)
    with pytest.raises(ValueError, match=f"{main} is damaged"):
        ProMoEPipeline.from_pretrained(tmp_path / "p")
    with pytest.raises(SystemExit, match="damaged"):
        sample(["--ckpt", str(tmp_path / "p"), "--out", str(tmp_path / "s"), "--num-images", "1"])
    # An intact main file beside an fp16 variant of NaN: the variant is the file checked, and refused.
    main.write_bytes(intact)
    variant = tmp_path / "p" / "transformer" / "diffusion_pytorch_model.fp16.safetensors"
    ProMoEPipeline.from_pretrained(tmp_path / "p", variant="fp16")
    damage(variant, 0x7E)  # fp16 0x7e7e: NaN
    ProMoEPipeline.from_pretrained(tmp_path / "p")  # the main file is intact
    with pytest.raises(ValueError, match=f"{variant} is damaged"):
        ProMoEPipeline.from_pretrained(tmp_path / "p", variant="fp16")
    # The VAE's weights carry their digest too.
    damage(tmp_path / "p" / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="vae/diffusion_pytorch_model.safetensors is damaged"):
        ProMoEPipeline.from_pretrained(tmp_path / "p")


def test_a_pipeline_folder_missing_its_vae_names_the_missing_folder(vae_dir, tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    model = tiny_model("DiT-S", learn_sigma=True)
    pipeline_of(model, DDPM(), AutoencoderKL.from_pretrained(vae_dir)).save_pretrained(tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "vae")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'p' / 'vae'} is missing"):
        ProMoEPipeline.from_pretrained(tmp_path / "p")
    with pytest.raises(SystemExit, match="vae is missing"):
        sample(["--ckpt", str(tmp_path / "p"), "--out", str(tmp_path / "s"), "--num-images", "1"])


def test_a_scheduler_of_another_objective_is_refused_naming_both():
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    rf = pipeline_of(tiny_model("ProMoE-S"), RectifiedFlow())
    for scheduler in (DDPMScheduler(), DDIMScheduler.from_config(rf.scheduler.config)):
        with pytest.raises(ValueError, match=f"{type(scheduler).__name__} does not sample this transformer, trained "
                                             "with rectified flow .*FlowMatchEulerDiscreteScheduler"):
            rf.scheduler = scheduler
    assert type(rf.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # the refused swap changed nothing
    ddpm = pipeline_of(tiny_model("ProMoE-S", learn_sigma=True), DDPM())
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler does not sample .* trained with DDPM"):
        ddpm.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="does not sample"):
        ProMoEPipeline(ProMoETransformer2DModel.from_dit(tiny_model("ProMoE-S"), "rf"), DDPMScheduler())


def test_dpm_solver_swapped_in_as_diffusers_users_do_is_set_to_the_models_objective():
    from diffusers import DPMSolverMultistepScheduler

    # Rectified flow: DPM-Solver gets the flow sigmas and the velocity, and solves the ODE our Euler solves: its
    # distance to a 200-step Euler shrinks with its steps as Euler's does (without them: mean |x| 140, not 0.9).
    model = tiny_model("ProMoE-S").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1 / 3)  # a smooth vector field
    pipe = pipeline_of(model, RectifiedFlow())

    def run(steps, **call):
        return pipe([1, 2, 3], num_inference_steps=steps, generator=torch.manual_seed(0), output_type="latent",
                    **call).images

    reference = run(200, sigmas=euler_sigmas(200)[:-1].tolist())
    euler_error = (run(30, sigmas=euler_sigmas(30)[:-1].tolist()) - reference).abs().max()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert (pipe.scheduler.config.use_flow_sigmas, pipe.scheduler.config.prediction_type) == (True, "flow_prediction")
    errors = [(run(steps) - reference).abs().max() for steps in (8, 30)]
    assert errors[1] < errors[0] and errors[1] < 2 * euler_error

    # DDPM with a learned variance: DPM-Solver from the DDPMScheduler's config reads the mean's channels and is the
    # CLI's `--scheduler dpm-solver++` to the last bit.
    model = tiny_model("ProMoE-S", learn_sigma=True).eval()
    pipe = pipeline_of(model, DDPM())
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.variance_type is None
    labels = torch.tensor([4, 4, 8])
    theirs = pipe(labels, guidance_scale=2.0, num_inference_steps=3, generator=torch.manual_seed(11),
                  output_type="latent").images
    assert torch.equal(theirs, generate(model, DDPM(), labels, torch.manual_seed(11), 3, 2.0,
                                        scheduler="dpm-solver++"))


def test_saving_after_a_swap_records_the_models_objective(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from promoe.sampling import load_model

    pipe = pipeline_of(tiny_model("ProMoE-S"), RectifiedFlow())
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "transformer" / "config.json").read_text())["objective"] == "rf"
    again = ProMoEPipeline.from_pretrained(tmp_path / "p")
    assert again.transformer.objective == "rf" and again.scheduler.config.use_flow_sigmas
    assert load_model(tmp_path / "p")[1].train.objective == "rf"  # what promoe.sample samples it with


def test_a_pipeline_folder_whose_scheduler_does_not_fit_its_model_is_refused(tmp_path):
    from diffusers import DDPMScheduler

    pipe = pipeline_of(tiny_model("ProMoE-S"), RectifiedFlow())
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    scheduler = tmp_path / "p" / "scheduler" / "scheduler_config.json"
    flow = json.loads(scheduler.read_text())
    # An rf model saved beside a DDPMScheduler (by hand: promoe refuses the swap) samples saturated pixels.
    (tmp_path / "p" / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers",
                                                                                        "DDPMScheduler"]}))
    DDPMScheduler().save_pretrained(tmp_path / "p" / "scheduler")
    with pytest.raises(ValueError, match="DDPMScheduler does not sample this transformer, trained with rectified"):
        ProMoEPipeline.from_pretrained(tmp_path / "p")
    # A number that sizes the scheduler's tables is checked before diffusers builds it.
    (tmp_path / "p" / "model_index.json").write_text(json.dumps(index))
    for steps in (2_000_000_000, -5):
        scheduler.write_text(json.dumps({**flow, "num_train_timesteps": steps}))
        with pytest.raises(ValueError, match=f"num_train_timesteps {steps}, the model's is 1000"):
            ProMoEPipeline.from_pretrained(tmp_path / "p")


def test_a_folder_written_before_the_objective_was_recorded_still_loads(tmp_path):
    model = tiny_model("ProMoE-S", learn_sigma=True)
    pipeline_of(model, DDPM(variance="fixed")).save_pretrained(tmp_path / "p")
    config = tmp_path / "p" / "transformer" / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "objective"}))
    pipe = ProMoEPipeline.from_pretrained(tmp_path / "p")
    assert pipe.transformer.objective == "ddpm-fixed"  # its DDPMScheduler's fixed variance says so, as before


def test_gradient_checkpointing_recomputes_each_block_and_gives_the_same_gradients():
    model = tiny_model("ProMoE-S").eval()
    transformer = ProMoETransformer2DModel.from_dit(model, "rf")
    inputs = model_inputs(model)

    def gradients():
        transformer.zero_grad()
        transformer(*inputs).sample.square().sum().backward()
        return {name: param.grad.clone() for name, param in transformer.named_parameters()}

    plain = gradients()
    calls = []
    for block in model.blocks:  # a pre-hook: the recomputation stops once it has what backward needs
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    transformer.enable_gradient_checkpointing()
    assert transformer.is_gradient_checkpointing
    checkpointed = gradients()
    assert len(calls) == 2 * len(model.blocks)  # forward, then again in backward
    assert_same_tensors(checkpointed, plain)
    with torch.no_grad():  # nothing to recompute without gradients
        calls.clear()
        transformer(*inputs)
        assert len(calls) == len(model.blocks)
    diffmoe = ProMoETransformer2DModel.from_dit(tiny_model("DiffMoE-S", experts="E4A1S0U0"))
    with pytest.raises(ValueError, match="running statistics"):
        diffmoe.enable_gradient_checkpointing()


def test_diffusers_finds_the_blocks_where_it_looks_for_them():
    transformer = ProMoETransformer2DModel.from_dit(tiny_model("ProMoE-S", depth=3))
    # regional compilation and device maps name block classes; block-level offloading looks under `dit`
    for names in (transformer._repeated_blocks, transformer._no_split_modules):
        assert [type(m).__name__ for m in transformer.modules() if type(m).__name__ in names] == ["DiTBlock"] * 3
    (child,) = transformer._group_offload_block_modules
    assert isinstance(getattr(transformer, child).blocks, torch.nn.ModuleList)


def fp8_rounded_reference(model, patterns):
    """A copy of `model` whose layers of the kinds diffusers casts (Linear, Conv, Embedding) and expert banks that no
    pattern names hold their parameters rounded to float8_e4m3fn: what layerwise casting stores, computed in fp32."""
    import copy
    import re

    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS  # as diffusers' own test reads it

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, (*_GO_LC_SUPPORTED_PYTORCH_LAYERS, ExpertBank)) and \
                    not any(re.search(p, name) for p in patterns):
                for param in module.parameters(recurse=False):
                    param.copy_(param.to(torch.float8_e4m3fn).float())
    return reference


@pytest.mark.parametrize("skip", ["declared", "none"])
def test_layerwise_casting_to_fp8_computes_the_fp8_rounded_model(skip):
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    model = tiny_model("ProMoE-S").eval()
    transformer = ProMoETransformer2DModel.from_dit(model, "rf")
    # "none", as diffusers' docs say: the model's patterns off and one that names no module (an empty one reads as
    # "the defaults"), so the embedders too store fp8 and compute in fp32
    patterns = (*DEFAULT_SKIP_MODULES_PATTERN, *transformer._skip_layerwise_casting_patterns) if skip == "declared" \
        else ("^no module$",)
    if skip == "none":
        transformer._skip_layerwise_casting_patterns = None
    reference = fp8_rounded_reference(transformer, patterns)
    inputs = model_inputs(model)
    with torch.no_grad():
        expected = reference(*inputs).sample
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32,
                                             **({} if skip == "declared" else dict(skip_modules_pattern=patterns)))
        assert model.blocks[0].attn.qkv.weight.dtype == torch.float8_e4m3fn  # stored in fp8
        assert model.blocks[1].mlp.experts.w_up_EDH.dtype == torch.float8_e4m3fn  # the experts too
        assert transformer.dtype == torch.float32
        out = transformer(*inputs).sample
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_a_half_model_with_an_fp32_pos_embed_runs_as_the_half_model():
    model = tiny_model("ProMoE-S").eval()
    inputs = model_inputs(model)
    half = ProMoETransformer2DModel.from_dit(model).to(torch.bfloat16)
    with torch.no_grad():
        expected = half(inputs[0].bfloat16(), *inputs[1:]).sample
        half.dit.pos_embed = half.dit.pos_embed.float()  # parameters cast one by one leave the buffer in fp32
        out = half(inputs[0].bfloat16(), *inputs[1:]).sample
    # Both add the same patches to the positions and round the sum to bf16 once (the second after adding the fp32
    # positions, the first the bf16-rounded ones): the one rounding of the positions is all that differs.
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=4 * 2**-8, atol=4 * 2**-8)


def test_layerwise_casting_skips_the_expert_banks_that_a_pattern_or_class_names():
    for skip in (dict(skip_modules_pattern=("mlp",)), dict(skip_modules_pattern=(r"blocks\.1$",)),
                 dict(skip_modules_classes=(ExpertBank,))):
        model = tiny_model("ProMoE-S").eval()
        ProMoETransformer2DModel.from_dit(model).enable_layerwise_casting(torch.float8_e4m3fn, torch.float32, **skip)
        assert model.blocks[1].mlp.experts.w_up_EDH.dtype == torch.float32, skip


def weights_absent_outside_their_calls(model: torch.nn.Module) -> None:
    """Each module's own floating-point parameters and buffers hold NaN except inside its call: what offloading does
    to a weight that is read outside its module's call (diffusers' disk offload leaves it uninitialised)."""
    for module in model.modules():
        tensors = [t for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
                   if t.is_floating_point()]
        if not tensors:
            continue
        values = [t.data for t in tensors]

        def bring_in(*_, tensors=tensors, values=values):
            for tensor, value in zip(tensors, values):
                tensor.data = value

        def take_away(*_, tensors=tensors):
            for tensor in tensors:
                tensor.data = torch.full_like(tensor.data, float("nan"))

        module.register_forward_pre_hook(bring_in)
        module.register_forward_hook(take_away)
        take_away()


@pytest.mark.parametrize("name", ZOO)
def test_every_weight_is_read_inside_its_own_modules_call(name):
    model = tiny_model(name, **ZOO[name]).eval()
    transformer = ProMoETransformer2DModel.from_dit(model, "rf")
    inputs = model_inputs(model)
    with torch.no_grad():
        expected = transformer(*inputs).sample
        weights_absent_outside_their_calls(transformer)
        banks = [module for module in model.modules() if isinstance(module, ExpertBank)]
        for weight in [model.blocks[0].attn.qkv.weight, *(bank.w_up_EDH for bank in banks)]:
            assert weight.isnan().all()  # taken away until their module runs
        assert torch.equal(transformer(*inputs).sample, expected)


@pytest.mark.parametrize("name", ZOO)
def test_leaf_level_group_offloading_to_disk_gives_the_unoffloaded_outputs(name, tmp_path):
    pytest.importorskip("accelerate")  # diffusers' offloading hooks move their inputs with accelerate's send_to_device
    model = tiny_model(name, **ZOO[name]).eval()
    transformer = ProMoETransformer2DModel.from_dit(model, "rf")
    inputs = model_inputs(model)
    with torch.no_grad():
        expected = transformer(*inputs).sample
        # On a CPU-only machine both devices are the CPU: disk is where the weights go and come back from.
        transformer.enable_group_offload(torch.device("cpu"), offload_type="leaf_level", offload_to_disk_path=tmp_path)
        for _ in range(2):  # the first call writes the files, the second reads them
            assert torch.equal(transformer(*inputs).sample, expected)
    offloaded = [module._diffusers_hook.get_hook("group_offloading").group for module in transformer.modules()
                 if hasattr(module, "_diffusers_hook")]
    if name != "DiT-S":  # each bank is a group of its own, in a file of its own
        banks = [group for group in offloaded if group.offload_leader is model.blocks[1].mlp.experts]
        assert len(banks) == 1 and Path(banks[0].safetensors_file_path).is_file()


def test_block_level_group_offloading_to_disk_moves_each_dit_block_alone(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_model("ProMoE-S", **ZOO["ProMoE-S"]).eval()
    transformer = ProMoETransformer2DModel.from_dit(model, "rf")
    inputs = model_inputs(model)
    with torch.no_grad():
        expected = transformer(*inputs).sample
        transformer.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1,
                                         offload_to_disk_path=tmp_path)
        for _ in range(2):
            assert torch.equal(transformer(*inputs).sample, expected)
    for block in model.blocks:  # found under `dit` (`_group_offload_block_modules`), each its own group and file
        group = block._diffusers_hook.get_hook("group_offloading").group
        assert group.modules == [block] and Path(group.safetensors_file_path).is_file()
