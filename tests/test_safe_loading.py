"""Files that users exchange never run code when loaded: a DCP folder's `.metadata` and its non-tensor items, an
official `.pth`; a converted safetensors file samples alone (its config travels in its metadata)."""

import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch

import promoe.convert
from promoe.sampling import load_model
from promoe.weights import load_dcp
from tests.helpers import TINY, randomize_
from tests.test_checkpoint_config import assert_same_weights, tiny_config, write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
ROOT = Path(__file__).resolve().parent.parent


class CreatesFile:
    """Unpickling it opens (creates) a file: the stand-in for any code a crafted pickle could run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_dcp_folder_whose_metadata_would_run_code_is_refused_and_runs_nothing(tmp_path):
    folder, marker = tmp_path / "step_0000001", tmp_path / "pwned"
    folder.mkdir()
    write_checkpoint(folder, tiny_config())
    (folder / ".metadata").write_bytes(pickle.dumps(CreatesFile(marker)))
    with open(folder / ".metadata", "rb") as file:
        pickle.load(file).close()  # what plain unpickling, as torch's reader does, would do
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=r"\.metadata: refused (io|builtins)\.open"):
        load_model(folder)
    assert not marker.exists()


def test_a_dcp_item_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"weights": torch.ones(3), "lr": 0.5, "item": CreatesFile(marker)}, checkpoint_id=str(tmp_path))
    state = {"weights": torch.zeros(3), "lr": 0.0}
    load_dcp(state, tmp_path)  # tensors and plain data load
    assert torch.equal(state["weights"], torch.ones(3)) and state["lr"] == 0.5
    with pytest.raises(ValueError, match="not plain data .*Unsupported global: GLOBAL (io|builtins).open"):
        load_dcp({"item": None}, tmp_path)
    assert not marker.exists()


def test_an_official_checkpoint_holding_objects_is_refused_with_a_message(tmp_path):
    path = tmp_path / "ckpt_step_1.pth"
    torch.save({"ema_model_state_dict": {}, "args": CreatesFile(tmp_path / "pwned")}, path)
    with pytest.raises(ValueError, match="objects other than tensors and plain data.*Unsupported global"):
        load_model(path, "ProMoE-S")
    assert not (tmp_path / "pwned").exists()


def test_a_converted_file_loads_and_samples_without_a_config_json_beside_it(tmp_path, monkeypatch):
    from promoe.sample import main as sample

    original = randomize_(promoe.build_model("ProMoE-S", **TINY))
    path = tmp_path / "ckpt_step_500000.pth"
    torch.save({"steps": 500000, "ema_model_state_dict": promoe.convert.promoe_to_official(original)}, path)
    monkeypatch.setattr(promoe.convert, "build_model", lambda name, **kw: promoe.build_model(name, **TINY, **kw))
    out = tmp_path / "converted" / "model.safetensors"
    promoe.convert.main([str(path), "--model", "ProMoE-S", "--out", str(out)])
    model, config = load_model(out)
    assert config is None and model.config == original.config  # an official model: latents, objective unknown
    assert_same_weights(model, original)
    # Sampling gets past loading: what it still needs is the VAE of a latent model.
    with pytest.raises(SystemExit, match="give --vae PATH"):
        sample(["--ckpt", str(out), "--objective", "rf", "--out", str(tmp_path / "samples"), "--steps", "1",
                "--num-images", "1"])


def test_every_torch_load_of_the_project_unpickles_weights_only():
    calls = [(path, line) for folder in ("promoe", "train", "bench", "kernels")
             for path in (ROOT / folder).rglob("*.py") for line in path.read_text().splitlines()
             if re.search(r"\btorch\.load\(", line)]
    assert calls, "the search found no torch.load at all: the test would pass vacuously"
    unsafe = [f"{path.relative_to(ROOT)}: {line.strip()}" for path, line in calls if "weights_only=True" not in line]
    assert not unsafe, unsafe
