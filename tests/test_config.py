"""Typed configuration: defaults, unknown keys, types, ranges, overrides, round trips."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from gfmfr_secure.config import (
    DATA_ENV_VAR,
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    from_dict,
    load_config,
    resolve_data_path,
    with_overrides,
)
from gfmfr_secure.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "gfmfr.yaml"


def test_default_file_is_the_schema_defaults():
    assert load_config(DEFAULT_CONFIG) == ExperimentConfig()
    # ... and spells out every key, not just the ones that differ from defaults.
    assert yaml.safe_load(DEFAULT_CONFIG.read_text()) == config_to_dict(ExperimentConfig())


def test_defaults_match_gfmfr_on_ml100k():
    cfg = ExperimentConfig()
    assert (cfg.method, cfg.seed, cfg.model.latent_dim, cfg.train.rounds) == ("gfmfr", 0, 64, 100)
    assert (cfg.train.lr, cfg.train.lr_decay, cfg.train.item_lr_decay) == (0.01, 0.8, 0.95)
    assert (cfg.model.scorer, cfg.train.item_aggregation, cfg.train.item_lr_scale) == ("dot", "sum", 50.0)
    assert (cfg.grouping.num_groups, cfg.fusion.embedding_dim) == (5, 512)
    assert cfg.fusion.modalities == ("text", "image")
    assert cfg.eval.ks == (10, 20, 50)


def test_partial_mapping_takes_defaults():
    cfg = config_from_dict({"train": {"rounds": 7}})
    assert cfg.train.rounds == 7
    assert cfg.train.lr == ExperimentConfig().train.lr
    assert cfg.fusion == ExperimentConfig().fusion


@pytest.mark.parametrize(
    ("data", "dotted", "listed"),
    [
        ({"trian": {}}, "'trian'", "method, seed, data, model, train"),
        ({"train": {"roundz": 5}}, "'train.roundz'", "rounds, local_epochs"),
        (
            {"fusion": {"modality": ["text"]}},
            "'fusion.modality'",
            "operator, embedding_dim, modalities",
        ),
    ],
)
def test_unknown_key_is_named_with_the_valid_keys(data, dotted, listed):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        config_from_dict(data)
    assert dotted in str(info.value)
    assert listed in str(info.value)


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"train": {"rounds": "ten"}}, ["train.rounds", "expected int", "'ten'"]),
        ({"train": {"rounds": 2.5}}, ["train.rounds", "expected int", "2.5"]),
        ({"train": {"rounds": True}}, ["train.rounds", "expected int", "True"]),
        ({"train": {"lr": "fast"}}, ["train.lr", "expected float", "'fast'"]),
        ({"distill": {"enabled": "yes please"}}, ["distill.enabled", "expected bool"]),
        ({"data": {"path": 3}}, ["data.path", "expected str or null", "3"]),
        (
            {"fusion": {"modalities": "text"}},
            ["fusion.modalities", "expected list of str", "'text'"],
        ),
        ({"eval": {"ks": [10, "x"]}}, ["eval.ks[1]", "expected int", "'x'"]),
        (
            {"data": {"format": "parquet"}},
            ["data.format", "'auto', 'ml100k-mm', 'csv'", "'parquet'"],
        ),
        ({"grouping": {"method": "louvain"}}, ["grouping.method", "'spectral'", "'louvain'"]),
        ({"model": {"backbone": 7}}, ["model.backbone", "expected str", "7"]),
        ({"train": 5}, ["train", "expected mapping", "5"]),
        ({"train": {"lr": math.nan}}, ["train.lr", "NaN"]),
    ],
)
def test_wrong_types_name_key_type_and_value(data, fragments):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_ints_and_numeric_strings_are_accepted_for_floats():
    cfg = config_from_dict({"train": {"lr": 1, "weight_decay": "1e-4"}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.rounds=0", "train.rounds"),
        ("train.client_fraction=0", "train.client_fraction"),
        ("train.client_fraction=1.5", "train.client_fraction"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-0.1", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("train.lr_decay=1.2", "train.lr_decay"),
        ("grouping.num_groups=0", "grouping.num_groups"),
        ("grouping.pca_variance=0", "grouping.pca_variance"),
        ("fusion.modalities=[text, audio]", "fusion.modalities"),
        ("fusion.modalities=[text, text]", "fusion.modalities"),
        ("eval.ks=[]", "eval.ks"),
        ("eval.ks=[10, 10]", "eval.ks"),
        ("seed=-1", "seed"),
        ("distill.ema_decay=1", "distill.ema_decay"),
        ("data.min_interactions=2", "data.min_interactions"),
        ("train.patience=-1", "train.patience"),
    ],
)
def test_out_of_range_values_are_rejected(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        with_overrides(ExperimentConfig(), [override])
    assert override in str(info.value)


def test_overrides_parse_values_as_yaml():
    cfg = with_overrides(
        ExperimentConfig(),
        [
            "train.rounds=5",
            "fusion.modalities=[text]",
            "data.path=/tmp/x",
            "method=fedrap",
            "distill.enabled=false",
            "train.lr=1e-3",
            "eval.ks=[5, 10]",
        ],
    )
    assert cfg.train.rounds == 5
    assert cfg.fusion.modalities == ("text",)
    assert cfg.data.path == "/tmp/x"
    assert cfg.distill.enabled is False
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.eval.ks == (5, 10)
    assert with_overrides(cfg, ["data.path=null"]).data.path is None
    assert with_overrides(cfg, ["fusion.modalities=[]"]).fusion.modalities == ()


def test_overrides_apply_in_order_and_merge_sections():
    cfg = with_overrides(ExperimentConfig(), ["train.rounds=5", "train.rounds=6"])
    assert cfg.train.rounds == 6
    merged = with_overrides(ExperimentConfig(), ["train={rounds: 3, lr: 0.01}"])
    assert (merged.train.rounds, merged.train.lr) == (3, 0.01)
    assert merged.train.batch_size == ExperimentConfig().train.batch_size


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.roundz=5", "unknown config key 'train.roundz'; valid keys in train: rounds"),
        ("attack.epsilon=1", "unknown config key 'attack'; valid keys in the top level: method"),
        ("seed.value=1", "'seed' is a value, not a section"),
        ("train.rounds", "expected the form dotted.key=value"),
        ("=5", "expected the form dotted.key=value"),
        ("train..rounds=5", "empty component"),
        ("train.rounds=[1", "not valid YAML"),
    ],
)
def test_bad_overrides_are_explained(override, message):
    with pytest.raises(ConfigError, match="override") as info:
        with_overrides(ExperimentConfig(), [override])
    assert message in str(info.value)


# A later section (privacy, say) only needs its dataclass: parsing and overrides are generic.
@dataclass(frozen=True)
class _Privacy:
    epsilon: float = 1.0
    delta: float | None = None
    accountant: str = "rdp"


@dataclass(frozen=True)
class _Root:
    seed: int = 0
    privacy: _Privacy = field(default_factory=_Privacy)
    tags: tuple[str, ...] = ()
    audit: _Privacy | None = None


def test_generic_from_dict_works_for_any_nested_dataclass():
    root = from_dict(_Root, {"privacy": {"epsilon": 8, "delta": 1e-5}, "tags": ["a", "b"]})
    assert root == _Root(privacy=_Privacy(epsilon=8.0, delta=1e-5), tags=("a", "b"))
    assert with_overrides(root, ["privacy.epsilon=.inf"]).privacy.epsilon == math.inf
    with pytest.raises(ConfigError, match="unknown config key 'privacy.sigma'"):
        from_dict(_Root, {"privacy": {"sigma": 1.0}})
    assert from_dict(_Root, {"audit": {"delta": 0.1}}).audit == _Privacy(delta=0.1)
    with pytest.raises(ConfigError, match="unknown config key 'audit.eps'; valid keys in audit"):
        from_dict(_Root, {"audit": {"eps": 1}})
    with pytest.raises(ConfigError, match="audit: expected mapping or null, got 3"):
        from_dict(_Root, {"audit": 3})
    with pytest.raises(ConfigError, match=r"run\.privacy\.epsilon"):
        from_dict(_Root, {"privacy": {"epsilon": "lots"}}, prefix="run")


def test_round_trip_dict_config_dict():
    cfg = with_overrides(ExperimentConfig(), ["fusion.modalities=[image]", "train.rounds=3"])
    as_dict = config_to_dict(cfg)
    assert isinstance(as_dict["fusion"]["modalities"], list)
    assert config_from_dict(as_dict) == cfg
    assert config_to_dict(config_from_dict(as_dict)) == as_dict


def test_round_trip_through_yaml_file(tmp_path):
    cfg = with_overrides(ExperimentConfig(), ["seed=3", "grouping.method=oblivious"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


def test_config_is_frozen_and_hashable():
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.rounds = 1  # type: ignore[misc]
    assert hash(cfg) == hash(ExperimentConfig())


def test_load_config_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml.*does not exist"):
        load_config(missing)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad_yaml)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml.*expected a mapping"):
        load_config(not_mapping)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown.yaml.*'train.epochs'"):
        load_config(unknown)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty, ["train.rounds=2"]).train.rounds == 2


def test_data_path_precedence(tmp_path):
    flag, env, key = (tmp_path / name for name in ("flag", "env", "key"))
    for folder in (flag, env, key):
        folder.mkdir()
    cfg = with_overrides(ExperimentConfig(), [f"data.path={key}"])
    environ = {DATA_ENV_VAR: str(env)}
    assert resolve_data_path(cfg, flag, environ).data.path == str(flag)
    assert resolve_data_path(cfg, None, environ).data.path == str(env)
    assert resolve_data_path(cfg, None, {}).data.path == str(key)
    with pytest.raises(ConfigError, match="no data folder"):
        resolve_data_path(ExperimentConfig(), None, {})
    with pytest.raises(ConfigError, match=rf"from \${DATA_ENV_VAR}.*not an existing directory"):
        resolve_data_path(cfg, None, {DATA_ENV_VAR: str(tmp_path / "missing")})


def test_relative_data_path_becomes_absolute(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    monkeypatch.chdir(tmp_path)
    resolved = resolve_data_path(ExperimentConfig(), "ds", {}).data.path
    assert resolved == str(tmp_path / "ds")


def test_fusion_compile_needs_sgd_and_a_hand_derived_operator():
    assert with_overrides(ExperimentConfig(), ["fusion.compile=true"]).fusion.compile is True
    for override in ("fusion.server_optimizer=adam", "fusion.operator=attention"):
        with pytest.raises(ConfigError, match=r"fusion\.compile needs fusion\.server_optimizer=sgd"):
            with_overrides(ExperimentConfig(), ["fusion.compile=true", override])
