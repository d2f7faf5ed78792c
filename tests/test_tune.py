"""Equal-budget tuning: validation-only selection, diverged settings, written outputs."""

from __future__ import annotations

import sys
import types

import pytest
import yaml

from evaluations.tune import parse_grid, tune
from gfmfr_secure.errors import ConfigError

RUNNER = "gfmfr_secure.simulation.runner"
CONFIG = "configs/fedrap.yaml"


class GridRunner:
    """Stand-in for run_training: validation NDCG is a function of the lr; some lrs diverge."""

    def __init__(self, score, diverge=()):
        self.score, self.diverge, self.lrs = score, set(diverge), []

    def run_training(self, cfg, run, *, progress=True, **options):
        self.lrs.append(cfg.train.lr)
        if cfg.train.lr in self.diverge:
            raise FloatingPointError(f"round 0: local training diverged (lr {cfg.train.lr})")
        val = self.score(cfg.train.lr)
        # the test figure is deliberately anti-correlated with validation: selection must ignore it
        return {"val": {"NDCG@10": val, "HR@10": 2 * val}, "test": {"NDCG@10": 1 - val}, "best_round": 3}


@pytest.fixture
def use_runner(monkeypatch):
    def install(runner):
        module = types.ModuleType(RUNNER)
        module.run_training = runner.run_training
        monkeypatch.setitem(sys.modules, RUNNER, module)
        return runner

    return install


def test_parse_grid_is_the_cartesian_product() -> None:
    assert parse_grid(["a=1,2", "b=x,y,z"]) == [[f"a={a}", f"b={b}"] for a in "12" for b in "xyz"]
    assert parse_grid([]) == [[]]
    for bad in ("a", "a=", "=1", "1"):
        with pytest.raises(ConfigError, match="key=v1,v2"):
            parse_grid([bad])


def test_selects_on_validation_only(use_runner, tmp_path) -> None:
    runner = use_runner(GridRunner(lambda lr: {0.01: 0.2, 0.05: 0.3, 0.2: 0.1}[lr]))
    report = tune([CONFIG], ["train.lr=0.01,0.05,0.2"], out_dir=tmp_path, data=str(tmp_path), seed=4, progress=False)
    assert runner.lrs == [0.01, 0.05, 0.2]
    tuned = yaml.safe_load((tmp_path / "tuned" / "fedrap.yaml").read_text())
    assert tuned["train"]["lr"] == 0.05 and tuned["seed"] == 4
    rows = [line for line in report.read_text().splitlines() if line.startswith("| fedrap")]
    assert [row.endswith("| yes |") for row in rows] == [False, True, False]
    assert not list(tmp_path.rglob("*.tmp"))


def test_diverged_settings_are_listed_and_never_selected(use_runner, tmp_path) -> None:
    use_runner(GridRunner(lambda lr: lr, diverge={0.2}))  # the diverging lr would score best
    report = tune([CONFIG], ["train.lr=0.01,0.2"], out_dir=tmp_path, data=str(tmp_path), progress=False)
    assert yaml.safe_load((tmp_path / "tuned" / "fedrap.yaml").read_text())["train"]["lr"] == 0.01
    assert "| fedrap | train.lr=0.2 | diverged |" in report.read_text()


def test_every_setting_diverging_is_an_error(use_runner, tmp_path) -> None:
    use_runner(GridRunner(lambda lr: lr, diverge={0.01, 0.2}))
    with pytest.raises(ConfigError, match=r"fedrap: every grid setting diverged"):
        tune([CONFIG], ["train.lr=0.01,0.2"], out_dir=tmp_path, data=str(tmp_path), progress=False)
    assert not (tmp_path / "tuned" / "fedrap.yaml").exists()
