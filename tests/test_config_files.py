"""Config files that name a `base` file: the paper's recipe lives in one file, each run adds its model."""

import dataclasses
import json
from pathlib import Path

import pytest

from promoe.train_config import RunConfig, _fill, load_config

ROOT = Path(__file__).resolve().parent.parent
# Each paper config as the flat file it was before the recipe moved to configs/base/ (the YAML mappings, verbatim).
FLAT = json.loads((ROOT / "tests" / "data" / "paper_configs_flat.json").read_text())


def test_every_paper_config_is_listed():
    shipped = {path.name for path in (ROOT / "configs").glob("*.yaml")} - {"demo.yaml"}
    assert shipped == set(FLAT)


@pytest.mark.parametrize("name", sorted(FLAT))
def test_paper_config_resolves_to_the_run_config_of_its_flat_file(name):
    expected = RunConfig()
    _fill(expected, FLAT[name], "", name)
    assert dataclasses.asdict(load_config(ROOT / "configs" / name)) == dataclasses.asdict(expected)


def test_the_paper_runs_take_the_diffmoe_and_ddpm_weights_of_the_official_code_and_paper():
    for name in FLAT:
        overrides = load_config(ROOT / "configs" / name).model.overrides
        if name.startswith("diffmoe_"):
            assert overrides == {"capacity_predictor_loss_weight": 0.01}
        elif name == "promoe_b_ddpm.yaml":
            assert overrides == {"rcl_weight": 10.0}
        else:
            assert overrides == {}, name


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_file_overrides_single_keys_of_its_base_sections(tmp_path):
    write(tmp_path / "recipes" / "root.yaml", "train:\n  steps: 7\n  seed: 3\noptim:\n  lr: 0.5\n"
                                              "model:\n  overrides:\n    depth: 2\n")
    write(tmp_path / "recipes" / "mid.yaml", "base: root.yaml\ntrain:\n  seed: 4\n")
    run = write(tmp_path / "run.yaml", "base: recipes/mid.yaml\ntrain:\n  steps: 9\n"
                                       "model:\n  name: DiT-S\n  overrides:\n    hidden_size: 64\n")
    config = load_config(run, ["optim.lr=0.25"])
    assert (config.train.steps, config.train.seed, config.optim.lr) == (9, 4, 0.25)
    assert config.model.name == "DiT-S" and config.model.overrides == {"depth": 2, "hidden_size": 64}


def test_base_is_found_beside_the_file_not_in_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "configs" / "recipe.yaml", "train:\n  steps: 11\n")
    write(tmp_path / "configs" / "run.yaml", "base: recipe.yaml\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("configs/run.yaml")).train.steps == 11


def test_an_unknown_key_of_a_base_file_names_that_file(tmp_path):
    base = write(tmp_path / "recipe.yaml", "train:\n  stepz: 11\n")
    run = write(tmp_path / "run.yaml", "base: recipe.yaml\n")
    with pytest.raises(ValueError, match=rf"unknown config key 'train.stepz' \(in {base}\)"):
        load_config(run)


def test_a_wrong_type_in_a_base_file_names_that_file(tmp_path):
    base = write(tmp_path / "recipe.yaml", "optim:\n  lr: fast\n")
    with pytest.raises(ValueError, match=rf"optim.lr: .*\(in {base}\)"):
        load_config(write(tmp_path / "run.yaml", "base: recipe.yaml\n"))


def test_a_cycle_of_base_files_is_refused(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ValueError, match=r"cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ValueError, match="cycle"):
        load_config(write(tmp_path / "self.yaml", "base: self.yaml\n"))


def test_a_missing_base_file_is_named(tmp_path):
    run = write(tmp_path / "run.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ValueError, match=rf"base: {tmp_path / 'nowhere.yaml'} does not exist \(named in {run}"):
        load_config(run)


def test_base_must_name_a_file(tmp_path):
    with pytest.raises(ValueError, match=r"base: expected the name of a YAML file, got \['a.yaml'\]"):
        load_config(write(tmp_path / "run.yaml", "base: [a.yaml]\n"))
