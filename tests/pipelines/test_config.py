from pathlib import Path

import pytest

from pipelines.config import ConfigError, RunConfig, from_dict, load_config
from pipelines.config import validate

PRESETS = sorted(Path("pipelines/configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load_and_name_known_methods(path):
    cfg = load_config(path)
    validate(cfg)
    assert cfg.stages[-1] == "report" and cfg.name == path.stem


def test_nested_values_are_typed():
    cfg = from_dict(RunConfig, {"task": {"recipe": {"lr": 1}}, "datamodels": {"lds_curve": [1, 2]}})
    assert cfg.task.recipe.lr == 1.0 and isinstance(cfg.task.recipe.lr, float)
    assert cfg.datamodels.lds_curve == (1, 2)


@pytest.mark.parametrize("data, message", [
    ({"sead": 1}, r"unknown config key 'sead' \(did you mean 'seed'\?\)"),
    ({"task": {"recipe": {"epoch": 3}}}, r"'task.recipe.epoch' \(did you mean 'task.recipe.epochs'\?\)"),
    ({"subsets": {"n_models": "many"}}, r"'subsets.n_models' must be int"),
    ({"subsets": {"alpha": True}}, r"'subsets.alpha' must be float"),
    ({"executor": []}, r"'executor' must be a mapping"),
])
def test_bad_keys_and_types_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, data)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("subsets: {alpha: 1.5}\n")
    with pytest.raises(ConfigError, match=r"subsets.alpha must be in \(0, 1\)"):
        load_config(bad)
    bad.write_text("unlearn: {methods: [dm_matchin]}\n")
    with pytest.raises(ConfigError, match="unknown unlearn.methods entry 'dm_matchin'"):
        validate(load_config(bad))
