"""Learning curves: the series read from a history, the PNG, and curve.png in a real train run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gfmfr_secure.config import load_config
from gfmfr_secure.curves import curve_series, plot_learning_curve
from gfmfr_secure.simulation.record import train_and_record

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_series_skip_rounds_without_validation_or_loss() -> None:
    history = [
        {"round": 0, "loss": 0.7, "val": {"NDCG@10": 0.02}},
        {"round": 1, "cohort": 0},  # an empty cohort: no loss, no validation
        {"round": 2, "loss": 0.5},  # not validated this round
        {"round": 3, "loss": float("nan"), "val": {"NDCG@10": 0.04, "HR@10": 0.1}},
    ]
    assert curve_series(history) == ([0, 3], [0.02, 0.04], [0, 2], [0.7, 0.5])
    assert curve_series(history, "HR@10")[:2] == ([3], [0.1])


def test_series_reject_a_record_without_round() -> None:
    with pytest.raises(ValueError, match="record 1 has no 'round'"):
        curve_series([{"round": 0}, {"loss": 1.0}])


@pytest.mark.parametrize("history", [[], [{"round": 0, "loss": 0.6, "val": {"NDCG@10": 0.03}}]])
def test_plot_writes_a_png_and_leaves_no_temporary_file(tmp_path: Path, history: list) -> None:
    out = plot_learning_curve(history, tmp_path / "curve.png", best_round=0, title="t")
    assert out == tmp_path / "curve.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


def test_a_train_run_folder_contains_curve_png(ml_folder: Path, tmp_path: Path) -> None:
    cfg = load_config(
        REPO / "configs" / "centralized.yaml",
        ["train.rounds=2", "train.patience=0", f"data.path={ml_folder}", "eval.ks=[1,10]"],
    )
    _, run_dir = train_and_record(cfg, tmp_path / "runs", name="curve", console=False, progress=False)
    assert (run_dir / "curve.png").read_bytes()[:8] == PNG_MAGIC
    history = json.loads((run_dir / "history.json").read_text())
    assert len(curve_series(history)[0]) == 2  # both rounds validated and drawn
