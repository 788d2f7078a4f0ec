"""No number forces unbounded work (issue 32): sampling steps, image and patch sizes, the model's widths and an
array's header are bounded (promoe.limits, promoe.config.SIZE_LIMITS) before any work, in one line naming the
option, key or file."""

import re
import zipfile

import numpy as np
import pytest
import torch

from promoe.limits import MAX_SAMPLING_STEPS


class CallsRefused(torch.nn.Module):
    """A model that fails the test if a sampler calls it: a refusal must come before the first step."""

    def forward(self, *args, **kwargs):
        pytest.fail("the sampler started work")


def test_the_sampling_cli_refuses_more_steps_than_the_limit(capsys):
    from promoe.sample import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(["--ckpt", "x", "--steps", "10000000"])
    assert stop.value.code == 2
    assert f"--steps 10000000: sampling takes 1..{MAX_SAMPLING_STEPS} steps" in capsys.readouterr().err
    assert parse_args(["--ckpt", "x", "--steps", str(MAX_SAMPLING_STEPS)]).steps == MAX_SAMPLING_STEPS


def test_every_sampler_refuses_more_steps_than_the_limit_before_laying_out_its_schedule():
    from promoe.diffusion import DDPM, RectifiedFlow, make_scheduler, sample_with_scheduler
    from promoe.diffusion.schedulers import _flow_euler

    noise, labels, too_many = torch.zeros(1, 4, 2, 2), torch.zeros(1, dtype=torch.long), MAX_SAMPLING_STEPS + 1
    message = rf"steps {too_many}: sampling takes 1\.\.{MAX_SAMPLING_STEPS} steps"
    with pytest.raises(ValueError, match=message):
        RectifiedFlow().sample(CallsRefused(), noise, labels, steps=too_many)
    with pytest.raises(ValueError, match=message):
        make_scheduler("flow-euler", RectifiedFlow(), too_many)
    with pytest.raises(ValueError, match="DDPM sampling takes 1..1000 steps"):
        DDPM().sample(CallsRefused(), noise, labels, steps=too_many)
    # ProMoEPipeline sets its scheduler's timesteps itself: the loop they run in refuses too many of them.
    scheduler = _flow_euler(RectifiedFlow())
    scheduler.set_timesteps(too_many)
    with pytest.raises(ValueError, match=rf"steps {too_many}: sampling takes"):
        sample_with_scheduler(scheduler, CallsRefused(), noise, labels)


@pytest.mark.parametrize("fields, message", [
    # 129 x 129 patches: a position embedding that no weight's shape bounds.
    ({"input_size": 258}, r"input_size: 258 / patch_size 2 makes 16641 tokens, more than 16384"),
    ({"input_size": 20006}, r"input_size: must be at most 4096, got 20006"),
    ({"hidden_size": 10**9, "num_heads": 4}, r"hidden_size: must be at most 16384, got 1000000000"),
    ({"depth": 10**6}, r"depth: must be at most 1024"),
    ({"num_classes": 10**9}, r"num_classes: must be at most 1048576"),
    ({"mlp_ratio": 1e9}, r"mlp_ratio: must be at most 64"),
    ({"experts": "E100000000A1S1U1"}, r"experts: .*at most 1024 experts"),
])
def test_model_sizes_beyond_the_limits_are_refused_naming_the_field(fields, message):
    from promoe.config import FieldError, ModelConfig

    with pytest.raises(FieldError, match=message):
        ModelConfig(**{"router": "promoe", **fields})


def test_weights_whose_config_asks_for_a_huge_position_embedding_are_refused_before_building(tmp_path):
    from promoe.sampling import load_model
    from tests.test_safe_loading import edited_metadata, saved_tiny_weights

    path = tmp_path / "ema.safetensors"
    saved_tiny_weights(path)
    edited_metadata(path, input_size=258)  # the patch embedding's weight does not depend on it
    with pytest.raises(ValueError, match=r"ema\.safetensors \(metadata\): model\.resolved\.input_size: 258 / "
                                         "patch_size 2 makes 16641 tokens"):
        load_model(path)


def test_a_model_larger_than_the_free_memory_is_refused_before_it_is_built(tmp_path, monkeypatch):
    import promoe.zoo
    from promoe.sampling import load_model
    from tests.test_safe_loading import saved_tiny_weights

    path = tmp_path / "ema.safetensors"
    saved_tiny_weights(path)
    monkeypatch.setattr(promoe.zoo, "available_memory", lambda: 2**10)
    dit = promoe.zoo.DiT

    def on_meta_only(*args, **kwargs):
        if torch.empty(0).device.type != "meta":
            pytest.fail("built for real")
        return dit(*args, **kwargs)

    monkeypatch.setattr(promoe.zoo, "DiT", on_meta_only)
    with pytest.raises(ValueError, match=r"ema\.safetensors: the model takes [\d.]+ MiB \(\d+ parameters and "
                                         r"buffers\), this machine has 0\.0 MiB free"):
        load_model(path)


def test_the_driver_refuses_a_huge_hidden_size_in_one_line_before_taking_the_folder(tmp_path):
    from tests.test_run_faults import driver

    result = driver(tmp_path / "run", "model.overrides.hidden_size=1000000000")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("config: model: hidden_size: must be at most 16384, got "
                                                      "1000000000 (on the command line)")
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def npz_with_header(path, shape, data: bytes = b"") -> None:
    """An .npz whose arr_0 header declares `shape` (uint8) whatever bytes follow it."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("arr_0.npy", "w") as entry:
            np.lib.format.write_array_header_1_0(entry, {"descr": "|u1", "fortran_order": False, "shape": shape})
            entry.write(data)


def test_an_npz_of_images_larger_than_the_limit_is_refused_before_reading_them(tmp_path):
    from promoe.eval.images import open_images

    npz_with_header(tmp_path / "huge.npz", (1, 40000, 40000, 3), bytes(2**20))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'huge.npz'} (arr_0): images of 40000x40000 pixels, "
                                                   "more than 4096x4096")):
        open_images(tmp_path / "huge.npz")


def test_a_batch_of_images_to_evaluate_stays_within_its_byte_budget(tmp_path, monkeypatch):
    import promoe.eval.images
    from promoe.eval.images import open_images

    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images)
    monkeypatch.setattr(promoe.eval.images, "IMAGE_BATCH_BYTES", 3 * images[0].nbytes)
    batches = list(open_images(tmp_path / "s.npz").batches(64))
    assert [len(batch) for batch in batches] == [3, 3, 3, 1]
    assert np.array_equal(np.concatenate(batches), images)
