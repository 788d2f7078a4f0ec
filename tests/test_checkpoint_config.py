"""A checkpoint's config.json and a safetensors file's metadata rebuild exactly the trained model: every ModelConfig
field is stored (format 2), older files still load, and weights that do not fit the rebuilt model are refused."""

import dataclasses
import json
import warnings

import pytest
import torch

import promoe.zoo
from promoe.sampling import load_model
from promoe.train_config import RunConfig, config_from_json, load_config, same_model
from promoe.weights import read_weights, save_weights
from tests.helpers import TINY, randomize_

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
TINY_OVERRIDES = [f"model.overrides.{key}={value}" for key, value in TINY.items()]


def tiny_config(*overrides: str) -> RunConfig:
    return load_config(None, ["model.name=ProMoE-S", *TINY_OVERRIDES, *overrides])


def write_checkpoint(folder, config: RunConfig) -> torch.nn.Module:
    """A distributed checkpoint folder as the driver writes it (model, EMA, config.json) of a random tiny model."""
    import torch.distributed.checkpoint as dcp

    model = randomize_(promoe.zoo.build_from_config(config.model_config()))
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()},
             "ema": {k: v.detach().clone() for k, v in model.named_parameters()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(folder))
    (folder / "config.json").write_text(config.to_json())
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    b_state = b.state_dict()
    assert a.state_dict().keys() == b_state.keys()
    for name, value in a.state_dict().items():
        assert torch.equal(value, b_state[name]), name


def old_format(text: str) -> str:
    """config.json as promoe wrote it before format 2: no version, the model as name + overrides only."""
    values = json.loads(text)
    del values["format_version"], values["model"]["resolved"]
    return json.dumps(values)


@pytest.fixture
def zoo_change(monkeypatch):
    """Narrower ProMoE experts in the zoo's table, as a later edit of promoe/zoo.py could make."""
    def change():
        monkeypatch.setitem(promoe.zoo.FAMILIES, "ProMoE", {**promoe.zoo.FAMILIES["ProMoE"],
                                                             "expert_hidden_ratio": 1.0})
    return change


def test_the_json_holds_every_model_field_and_round_trips():
    config = tiny_config("model.overrides.router_scale=2")
    stored = json.loads(config.to_json())
    assert stored["format_version"] == 2
    assert stored["model"]["resolved"] == dataclasses.asdict(config.model_config())
    again = config_from_json(config.to_json(), "config.json")
    assert again.model_config() == config.model_config() and again.to_json() == config.to_json()


def test_a_zoo_change_does_not_change_what_a_checkpoint_rebuilds_into(tmp_path, zoo_change):
    config = tiny_config()
    trained = write_checkpoint(tmp_path, config)
    export = tmp_path / "ema.safetensors"
    save_weights(export, trained.state_dict(), config.model_config(), config)
    zoo_change()
    assert tiny_config().model_config().expert_hidden_ratio == 1.0  # the zoo did change
    for source in (tmp_path, export):
        model, loaded = load_model(source)
        assert model.config == trained.config == loaded.model_config()
        assert_same_weights(model, trained)


def test_an_old_format_config_still_loads_from_todays_zoo(tmp_path):
    config = tiny_config()
    trained = write_checkpoint(tmp_path, config)
    (tmp_path / "config.json").write_text(old_format(config.to_json()))
    model, loaded = load_model(tmp_path)
    assert loaded.model.resolved is None and loaded.model_config() == config.model_config()
    assert_same_weights(model, trained)
    assert json.loads(loaded.to_json())["model"]["resolved"] == dataclasses.asdict(config.model_config())


def test_an_old_format_checkpoint_after_a_zoo_change_is_refused_naming_the_parameter(tmp_path, zoo_change):
    write_checkpoint(tmp_path, tiny_config())
    (tmp_path / "config.json").write_text(old_format(tiny_config().to_json()))
    zoo_change()
    with pytest.raises(ValueError, match=r"key 'blocks\.1\.mlp\.experts\.w_up_EDH' has shape \[13, 32, 64\], "
                                         r"the model expects \[13, 32, 32\]"):
        load_model(tmp_path)


def test_weights_that_do_not_fit_the_stored_config_are_refused_naming_the_parameter(tmp_path):
    config, deeper = tiny_config(), tiny_config("model.overrides.depth=3")
    trained = write_checkpoint(tmp_path, config)
    (tmp_path / "config.json").write_text(deeper.to_json())
    with pytest.raises(ValueError, match=r"missing key 'blocks\.2\.attn\.qkv\.weight'"):
        load_model(tmp_path)
    export = tmp_path / "ema.safetensors"
    save_weights(export, trained.state_dict(), tiny_config("model.overrides.hidden_size=64").model_config())
    with pytest.raises(ValueError, match=r"ema\.safetensors.*key 'x_embedder\.proj\.weight' has shape "
                                         r"\[32, 4, 2, 2\], the model expects \[64, 4, 2, 2\]"):
        load_model(export)


def test_a_config_of_a_newer_format_or_with_an_impossible_field_is_refused():
    text = tiny_config().to_json()
    with pytest.raises(ValueError, match="format_version 3"):
        config_from_json(text.replace('"format_version": 2', '"format_version": 3'), "config.json")
    bad = json.loads(text)
    bad["model"]["resolved"]["depth"] = 0
    with pytest.raises(ValueError, match=r"config.json: model.resolved.depth: must be >= 1"):
        config_from_json(json.dumps(bad), "config.json")
    bad["model"]["resolved"]["colour"] = "red"
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        config_from_json(json.dumps(bad), "config.json")


def test_same_model_names_each_field_that_differs_and_ignores_the_dispatch_backend(zoo_change):
    saved = config_from_json(tiny_config().to_json(), "config.json")
    assert same_model(saved, tiny_config()) is None
    assert same_model(saved, tiny_config("model.overrides.dispatch=loop")) is None
    assert same_model(saved, tiny_config("model.overrides.depth=3")) == \
        "depth: the checkpoint has 2, the config asks for 3"
    zoo_change()  # the same YAML now asks for another model: resuming would silently change it
    assert "expert_hidden_ratio: the checkpoint has 2.0, the config asks for 1.0" in same_model(saved, tiny_config())


def test_a_safetensors_file_carries_its_configs(tmp_path):
    config = tiny_config()
    model = promoe.zoo.build_from_config(config.model_config())
    save_weights(tmp_path / "w.safetensors", model.state_dict(), model.config, config, note="x")
    state, model_config, run_config = read_weights(tmp_path / "w.safetensors")
    assert model_config == model.config and run_config.to_json() == config.to_json()
    save_weights(tmp_path / "bare.safetensors", model.state_dict(), model.config)  # a converted file: no run
    _, model_config, run_config = read_weights(tmp_path / "bare.safetensors")
    assert model_config == model.config and run_config is None
