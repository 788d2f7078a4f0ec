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


# -- issue 22: every reader verifies what resume verifies; what a file says is bounded before it is used ------------

def damaged_copy(tiny_run, tmp_path) -> Path:
    """A copy of a tiny run's checkpoint folder (it has a manifest) with one byte of a shard changed, size kept."""
    import shutil

    folder = tmp_path / "step_0000003"
    shutil.copytree(tiny_run / "checkpoints" / "step_0000003", folder)
    shard = next(folder.glob("*.distcp"))
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))
    return folder


def test_sampling_and_routing_maps_refuse_a_checkpoint_whose_bytes_changed(tiny_run, tmp_path):
    from promoe.sample import main as sample
    from promoe.viz.routing import main as routing

    folder = damaged_copy(tiny_run, tmp_path)
    with pytest.raises(ValueError, match=r"step_0000003 is damaged: .*\.distcp does not match the digest"):
        load_model(folder)
    with pytest.raises(SystemExit, match=r"^error: checkpoint .*step_0000003 is damaged"):
        sample(["--ckpt", str(folder), "--out", str(tmp_path / "samples"), "--steps", "1", "--num-images", "1"])
    with pytest.raises(SystemExit, match=r"^error: checkpoint .*step_0000003 is damaged"):
        routing(["--ckpt", str(folder), "--class", "0", "--out", str(tmp_path / "maps"), "--steps", "1"])
    assert not (tmp_path / "samples").exists() and not (tmp_path / "maps").exists()


def test_a_checkpoint_folder_without_a_manifest_is_read_and_named_unverified(tmp_path, capsys):
    folder = tmp_path / "step_0000001"
    folder.mkdir()
    write_checkpoint(folder, tiny_config())
    load_model(folder)
    assert f"{folder} has no manifest.json" in capsys.readouterr().err


def edited_metadata(path: Path, **fields) -> None:
    """Rewrite a safetensors file with model_config fields replaced in its metadata (as a 2 KB edit would)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    metadata.pop("run_config", None)
    metadata["model_config"] = json.dumps({**json.loads(metadata["model_config"]), **fields})
    save_file(load_file(str(path)), str(path), metadata=metadata)


def saved_tiny_weights(path: Path, **overrides) -> torch.nn.Module:
    from promoe.weights import save_weights

    model = promoe.build_model("ProMoE-S", **{**TINY, **overrides})
    save_weights(path, model.state_dict(), model.config)
    return model


@pytest.mark.parametrize("fields, message", [
    # A real build would ask for terabytes (a Linear of 2**20 x 2**22): refused by the size limits of the config.
    ({"hidden_size": 2**20, "num_heads": 4}, r"model\.resolved\.hidden_size: must be at most 16384, got 1048576"),
    ({"hidden_size": 10**9, "num_heads": 4}, r"hidden_size: must be at most 16384"),
    ({"depth": 10**6}, r"depth: must be at most 1024"),
    # Within the limits, compared on meta: nothing is allocated.
    ({"hidden_size": 16384, "num_heads": 4}, r"key 'x_embedder\.proj\.weight' has shape \[32, 4, 2, 2\], the model "
                                             r"expects \[16384, 4, 2, 2\]"),
    # A thousand blocks: the skeleton has one block more than the file, enough to name the first one it lacks.
    ({"depth": 1000}, r"missing key 'blocks\.2\."),
])
def test_weights_metadata_asking_for_a_huge_model_is_refused_before_anything_is_allocated(tmp_path, fields, message):
    import time

    path = tmp_path / "w.safetensors"
    saved_tiny_weights(path)
    edited_metadata(path, **fields)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        load_model(path)
    assert time.perf_counter() - start < 5


def test_a_path_inside_weights_metadata_is_refused_and_not_read(tmp_path, monkeypatch):
    import promoe.config

    path = tmp_path / "w.safetensors"
    saved_tiny_weights(path, router="classifier", superclasses=[0, 1] * 5, experts="E3A1S1U0")
    edited_metadata(path, superclasses=str(tmp_path / "anything.txt"))
    monkeypatch.setattr(promoe.config, "read_small_text", lambda *args: pytest.fail("a file named by metadata read"))
    with pytest.raises(ValueError, match=r"superclasses names a file .*anything\.txt.*holds the list itself"):
        load_model(path)


def test_saved_weights_and_run_configs_carry_the_superclass_list_inline(tmp_path):
    import json

    from safetensors import safe_open

    mapping = tmp_path / "superclasses.txt"
    mapping.write_text("0 1 " * 5)
    path = tmp_path / "w.safetensors"
    saved_tiny_weights(path, router="classifier", superclasses=str(mapping), experts="E3A1S1U0")
    with safe_open(str(path), framework="pt") as file:
        assert json.loads(file.metadata()["model_config"])["superclasses"] == [0, 1] * 5
    config = tiny_config("model.overrides.router=classifier", f"model.overrides.superclasses={mapping}",
                         "model.overrides.experts=E3A1S1U0")
    assert json.loads(config.to_json())["model"]["resolved"]["superclasses"] == [0, 1] * 5
    mapping.unlink()  # the file is read once, at the config: the checkpoint's config needs it no more
    model, _ = load_model(path)
    assert model.config.superclasses == [0, 1] * 5


def crafted_index(folder: Path, **storage) -> None:
    """Rewrite a DCP folder's `.metadata` with the first item's storage fields replaced (classes DCP writes only)."""
    import dataclasses

    from promoe.weights import read_dcp_metadata

    metadata = read_dcp_metadata(folder)
    metadata.storage_meta = None
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first] = dataclasses.replace(metadata.storage_data[first], **storage)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("storage, message", [
    ({"relative_path": "../elsewhere.distcp"}, r"names '\.\./elsewhere\.distcp', which is not a file of"),
    ({"length": 1 << 40}, r"its index reads bytes 0 to 1099511627776: cut short\?"),
])
def test_a_dcp_index_that_would_read_outside_its_files_is_refused(tmp_path, storage, message):
    folder = tmp_path / "step_0000001"
    folder.mkdir()
    write_checkpoint(folder, tiny_config())
    (tmp_path / "elsewhere.distcp").write_bytes(next(folder.glob("*.distcp")).read_bytes())
    crafted_index(folder, **storage)
    with pytest.raises(ValueError, match=message):
        load_model(folder)


@pytest.mark.parametrize("name, content, message", [
    ("config.json", b" " * (2 << 20), r"config\.json is larger than 1024 KiB, too large for a run's config"),
    ("manifest.json", b'{"files": {"../../x": {"bytes": 0, "blake2b": ""}}}', r"manifest\.json is unreadable .*"
                                                                                r"not a file of the folder"),
])
def test_what_a_checkpoint_folder_can_make_us_read_is_bounded(tmp_path, name, content, message):
    folder = tmp_path / "step_0000001"
    folder.mkdir()
    write_checkpoint(folder, tiny_config())
    (folder / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_model(folder)


def test_convert_refuses_a_pickle_in_one_line_naming_the_object(tmp_path, capsys):
    path = tmp_path / "ckpt_step_1.pth"
    torch.save({"ema_model_state_dict": {}, "args": CreatesFile(tmp_path / "pwned")}, path)
    with pytest.raises(SystemExit) as stopped:
        promoe.convert.main([str(path), "--model", "ProMoE-S", "--out", str(tmp_path / "out.safetensors")])
    message = str(stopped.value.code)
    assert message.startswith(f"error: {path} holds objects other than tensors") and "\n" not in message
    assert "GLOBAL io.open" in message or "GLOBAL builtins.open" in message
    assert "weights_only" not in message and "add_safe_globals" not in message
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.safetensors").exists()


def test_a_safetensors_file_whose_tensor_bytes_changed_is_refused(tmp_path):
    from promoe.sample import main as sample

    path = tmp_path / "w.safetensors"
    saved_tiny_weights(path)
    content = bytearray(path.read_bytes())
    content[-10] ^= 0xFF  # inside the last tensor's data: the file still parses, its weights are wrong
    path.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=r"w\.safetensors is damaged: its tensors do not match the digest"):
        load_model(path)
    with pytest.raises(SystemExit, match=r"^error: .*w\.safetensors is damaged"):
        sample(["--ckpt", str(path), "--objective", "rf", "--out", str(tmp_path / "s"), "--num-images", "1"])
