"""The rules that span config sections (gfmfr_secure.config_rules.validate): each rejects its
combination through the command line with exit status 2 before any data loads, and every
shipped experiment config passes them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gfmfr_secure import cli
from gfmfr_secure.config import config_from_dict, load_config, with_overrides
from gfmfr_secure.config_rules import METHODS, validate
from gfmfr_secure.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
#: folders of configs/ that hold other kinds of YAML (encoder pipelines, sweep plans)
NOT_EXPERIMENTS = ("encoders", "sweeps")

#: one case per rule of validate(): (config file, overrides, what the error says)
RULES = {
    "unknown backbone": ("fedrap.yaml", ["model.backbone=mf"], "model.backbone='mf' is unknown; known: fedncf, fedrap, pfedrec"),
    "distillation needs a shared head": ("pfedrec.yaml", ["distill.enabled=true"], "distill.enabled needs a shared output layer; backbone 'pfedrec'"),
    "unknown method": ("fedrap.yaml", ["method=nope"], "unknown method 'nope'; known:"),
    "method's backbone": ("fedrap.yaml", ["model.backbone=fedncf"], "method 'fedrap' uses model.backbone='fedrap', config has 'fedncf'"),
    "method's distillation": ("fedrap.yaml", ["distill.enabled=true"], "method 'fedrap' needs distill.enabled=False, config has True"),
    "method's grouping": ("mm-fedrap.yaml", ["grouping.method=spectral"], "method 'mm-fedrap' needs grouping.method in ['none'], config has 'spectral'"),
    "unknown backend": ("fedrap.yaml", ["aggregation.backend=paillier"], "aggregation.backend='paillier' is unknown; known: ckks, masking, plain"),
    "server grouping under a secure backend": ("gfmfr.yaml", ["aggregation.backend=ckks", "grouping.method=spectral"], "grouping.method='spectral' clusters individual client updates, which backend 'ckks' does not expose"),
    "secure sums are unweighted": ("fedrap.yaml", ["aggregation.backend=masking", "train.weighting=samples"], "aggregation.backend='masking' sums uploads without weights: set train.weighting=uniform"),
    "masking refuses central noise": ("fedrap.yaml", ["aggregation.backend=masking", "privacy.mechanism=central", "privacy.noise_multiplier=1"], "central DP noise would be added after it saw the noiseless sum"),
    "user-level DP is unweighted": ("fedrap.yaml", ["privacy.mechanism=distributed", "privacy.noise_multiplier=1", "train.weighting=samples"], "privacy.mechanism=distributed: user-level DP bounds each client's contribution: set train.weighting=uniform"),
    "DP-SGD is unweighted": ("fedrap.yaml", ["privacy.mechanism=dpsgd", "train.weighting=samples"], "privacy.mechanism=dpsgd: clients do not upload their sample counts; set train.weighting=uniform"),
    "adaptive clipping needs a released count": ("fedrap.yaml", ["privacy.mechanism=local", "privacy.noise_multiplier=1", "privacy.adaptive_clip=true"], "privacy.adaptive_clip needs a released count of unclipped clients"),
}


def _experiment_configs() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] not in NOT_EXPERIMENTS)


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_is_a_config_error_before_any_data_loads(rule: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI prints the rule's ``error:`` and exits 2, although ``--data`` names no folder (the config is checked first)."""
    monkeypatch.delenv("GFMFR_DATA", raising=False)
    config, overrides, message = RULES[rule]
    argv = ["train", "--config", str(CONFIGS / config), "--data", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "runs")]
    for text in overrides:
        argv += ["--set", text]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "no-such-folder" not in err
    assert not (tmp_path / "runs").exists()


def test_the_rules_stop_a_run_before_its_data_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same run with a valid config gets as far as the missing data folder, so the rule (not the data) stopped it above."""
    argv = ["train", "--config", str(CONFIGS / "fedrap.yaml"), "--data", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "runs")]
    assert cli.main(argv) == 2
    assert "no-such-folder" in capsys.readouterr().err


@pytest.mark.parametrize("path", _experiment_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_experiment_config_passes_validation(path: Path) -> None:
    cfg = load_config(path)
    validate(cfg)
    assert cfg.method in METHODS


def test_with_overrides_validates_and_config_from_dict_does_not() -> None:
    """config_from_dict builds a base for overrides (a bare method name need not be consistent yet);
    with_overrides validates what it returns, with or without overrides."""
    base = config_from_dict({"method": "fedrap"})  # distill.enabled defaults to true
    with pytest.raises(ConfigError, match="method 'fedrap' needs distill.enabled=False"):
        with_overrides(base, [])
    assert with_overrides(base, ["distill.enabled=false"]).distill.enabled is False


def test_the_rules_module_imports_no_heavy_module() -> None:
    """Importing the config (and its rules) loads no torch: the registries are looked up when validate runs."""
    import subprocess

    code = "import sys, gfmfr_secure.config, gfmfr_secure.config_rules; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "False"
