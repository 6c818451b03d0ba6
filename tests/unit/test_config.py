from pathlib import Path

import pytest
import yaml

from rdistill.config import Config, ConfigError, dump_config, load_config, parse_override

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_defaults_are_the_papers():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.prune.ratio == 0.2 and cfg.prototypes.pairless == "keep" and cfg.captions.retrieve


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cluster:\n  num_pairs: 300\nprune:\n  ratio: 0.1\n")
    cfg = load_config(path, ["prune.ratio=0.3", "prototypes.pairless=drop", "cluster.gpu=true"])
    assert cfg.cluster.num_pairs == 300 and cfg.prune.ratio == 0.3
    assert cfg.prototypes.pairless == "drop" and cfg.cluster.gpu is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.num_pair=3", "unknown config key cluster.num_pair"),
        ("clusters.num_pairs=3", "unknown config key clusters"),
        ("cluster.num_pairs=abc", "cluster.num_pairs: expected an integer"),
        ("cluster.num_pairs=0", "cluster.num_pairs: 0 is below the minimum 1"),
        ("prune.ratio=1.5", "prune.ratio: 1.5 is above the maximum"),
        ("prototypes.pairless=sometimes", "prototypes.pairless: 'sometimes' is not one of keep, drop, refill"),
        ("cluster.gpu=1", "cluster.gpu: expected true or false"),
        ("cluster=3", "cluster: expected a mapping"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, [override])


def test_bad_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("prune:\n  ratoi: 0.3\n")
    with pytest.raises(ConfigError, match=r"unknown config key prune\.ratoi .*bad\.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["cluster.num_pairs=42"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_override_values_are_yaml():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=0.5") == ("a", 0.5)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=drop") == ("a", "drop")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    assert yaml.safe_load(path.read_text())
    load_config(path)
