"""train --resume: a run stopped mid-way (in process, or killed) ends as the uninterrupted run; refusals."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gfmfr_secure import cli
from gfmfr_secure.data import make_synthetic
from gfmfr_secure.roles import client as client_role
from gfmfr_secure.simulation.checkpoint import CHECKPOINT_DIR, read_checkpoint_meta

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "gfmfr.yaml"
SMALL = [
    "train.rounds=5", "train.local_epochs=1", "train.batch_size=32", "train.lr=0.05", "train.item_lr_scale=4",
    "train.user_lr=0.2", "fusion.server_epochs=2", "fusion.embedding_dim=16", "model.latent_dim=8",
    "grouping.num_groups=3", "eval.ks=[10,20,50]", "secrets=reproducible",
]
#: validates rounds 0-2, then early stopping ends the run (best round 1; seed 1 since negatives are keyed per user)
PLAIN = [*SMALL, "train.item_lr_scale=100", "train.patience=1", "seed=1"]
#: central DP with oblivious grouping (centroids, group floor), client sampling and adaptive clipping
CENTRAL_DP = [
    *SMALL, "grouping.method=oblivious", "grouping.min_group_size=4", "train.selection=last", "train.client_fraction=0.7",
    "privacy.mechanism=central", "privacy.noise_multiplier=1.3", "privacy.clip=0.5", "privacy.delta=1e-3",
    "privacy.adaptive_clip=true",
]
RUN_FILES = ["config.yaml", "curve.png", "history.json", "log.txt", "metrics.json", "model.pt", "run.json"]


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small synthetic data as an interactions CSV with text and image feature files."""
    data = make_synthetic(60, 80, n_groups=3, mean_interactions=12, text_dim=8, image_dim=6, seed=7)
    folder = tmp_path_factory.mktemp("resume-data")
    rows = "".join(f"{u},{i},{r:g},{t}\n" for u, i, r, t in zip(data.users, data.items, data.ratings, data.timestamps, strict=True))
    (folder / "interactions.csv").write_text("userId,itemId,rating,timestamp\n" + rows)
    np.save(folder / "text.npy", data.text_features)
    np.save(folder / "image.npy", data.image_features)
    return folder


def train_argv(data: Path, out: Path, name: str, overrides: list[str]) -> list[str]:
    sets = [*overrides, f"data.text_features={data / 'text.npy'}", f"data.image_features={data / 'image.npy'}"]
    return ["train", "--config", str(CONFIG), "--data", str(data), "--out", str(out), "--name", name, "--quiet"] + [
        arg for s in sets for arg in ("--set", s)
    ]


def without_clock(value: Any) -> Any:
    """``value`` less wall-clock fields (``*_s`` keys, ``timing``), which no two runs share."""
    if isinstance(value, dict):
        return {k: without_clock(v) for k, v in value.items() if not k.endswith("_s") and k != "timing"}
    if isinstance(value, list):
        return [without_clock(v) for v in value]
    return value


def results(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    return without_clock(metrics), without_clock(history)


def partial_of(out: Path, name: str) -> Path:
    (found,) = out.glob(f".{name}.partial-*")
    return found


@pytest.fixture(scope="module")
def reference(data_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs of both settings."""
    out = tmp_path_factory.mktemp("reference")
    for name, overrides in (("plain", PLAIN), ("dp", CENTRAL_DP)):
        assert cli.main(train_argv(data_folder, out, name, overrides)) == 0
    return {"plain": out / "plain", "dp": out / "dp"}


@pytest.mark.parametrize(
    ("setting", "stop_at", "saved"),
    [
        ("plain", 3, {"next_round": 2, "stopped": False, "snapshot": "current"}),  # in round 2, after training
        ("plain", 4, {"next_round": 3, "stopped": True, "snapshot": "best-round1.pt"}),  # in the test evaluation
        ("dp", 2, {"next_round": 1, "stopped": False, "snapshot": "current"}),  # in round 1, after the release
    ],
)
def test_stopped_in_process_then_resumed_equals_uninterrupted(
    setting: str, stop_at: int, saved: dict[str, Any], reference: dict[str, Path], data_folder: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    calls = {"n": 0}
    validate = client_role.user_ranks

    def interrupt_in_round(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == stop_at:  # the round has trained and aggregated; its checkpoint is not written yet
            raise KeyboardInterrupt
        return validate(*args, **kwargs)

    monkeypatch.setattr(client_role, "user_ranks", interrupt_in_round)
    out = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        cli.main(train_argv(data_folder, out, "run", PLAIN if setting == "plain" else CENTRAL_DP))
    monkeypatch.setattr(client_role, "user_ranks", validate)
    partial = partial_of(out, "run")
    assert not (out / "run").exists()
    meta = read_checkpoint_meta(partial / CHECKPOINT_DIR)
    assert {k: meta[k] for k in saved} == saved
    capsys.readouterr()

    assert cli.main(["train", "--resume", str(partial), "--quiet"]) == 0
    run_dir = out / "run"
    assert sorted(p.name for p in out.iterdir()) == ["run"]
    assert sorted(p.name for p in run_dir.iterdir()) == RUN_FILES  # the checkpoint is gone
    printed = capsys.readouterr().out
    assert all(f"{m}@{k}=" in printed for m in ("HR", "NDCG") for k in (10, 20, 50))

    metrics, history = results(run_dir)
    ref_metrics, ref_history = results(reference[setting])
    assert history == ref_history
    assert [h["round"] for h in history] == list(range(len(history)))
    assert metrics == ref_metrics
    if setting == "dp":
        privacy = metrics["privacy"]
        assert privacy["rounds"] == 5 and privacy["epsilon_if_covered"] > 0
        assert privacy["epsilon_if_covered"] == json.loads((reference["dp"] / "metrics.json").read_text())["privacy"]["epsilon_if_covered"]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resumed"][0]["after_round"] == saved["next_round"] - 1
    assert record["finished_at"] >= record["started_at"]


def test_killed_process_then_resumed_equals_uninterrupted(data_folder: Path, tmp_path: Path) -> None:
    overrides = [*SMALL, "train.rounds=30", "train.patience=0"]
    out = tmp_path / "runs"
    argv = [*train_argv(data_folder, out, "killed", overrides), "--no-keep-model"]
    proc = subprocess.Popen([sys.executable, "-m", "gfmfr_secure", *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        meta = None
        while proc.poll() is None and time.monotonic() < deadline:
            partial = next(out.glob(".killed.partial-*"), None) if out.is_dir() else None
            meta = None if partial is None else read_checkpoint_meta(partial / CHECKPOINT_DIR)
            if meta is not None and meta["next_round"] >= 2:  # round 1 is checkpointed
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and meta is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
    assert not (out / "killed").exists()

    assert cli.main(["train", "--resume", str(out / "killed"), "--quiet"]) == 0  # the final path finds the partial folder
    assert cli.main([*train_argv(data_folder, tmp_path / "reference", "whole", overrides), "--no-keep-model"]) == 0
    assert results(out / "killed") == results(tmp_path / "reference" / "whole")
    assert sorted(p.name for p in (out / "killed").iterdir()) == [f for f in RUN_FILES if f != "model.pt"]  # the run's choice
    assert sorted(p.name for p in out.iterdir()) == ["killed"]


@pytest.fixture
def interrupted(data_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The partial folder of a run stopped in round 1, on a copy of the data (which a test may change)."""
    data = tmp_path / "data"
    data.mkdir()
    for f in data_folder.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    validate = client_role.user_ranks
    calls = {"n": 0}

    def interrupt_in_round_1(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return validate(*args, **kwargs)

    monkeypatch.setattr(client_role, "user_ranks", interrupt_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        cli.main(train_argv(data, tmp_path / "runs", "run", PLAIN))
    monkeypatch.setattr(client_role, "user_ranks", validate)
    return partial_of(tmp_path / "runs", "run")


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    capsys.readouterr()
    assert cli.main(["train", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_resume_refusals_exit_2_and_keep_the_folder(
    interrupted: Path, reference: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused(["--resume", str(tmp_path / "runs" / "nothing")], capsys, "does not exist")
    refused(["--resume", str(reference["plain"])], capsys, "already complete")
    refused(["--resume", str(interrupted), "--config", str(CONFIG)], capsys, "drop --config")
    refused(["--resume", str(interrupted), "--set", "train.rounds=9", "--seed", "3"], capsys, "drop --set, --seed")
    refused(["--config", str(CONFIG), "--resume", str(interrupted), "--checkpoint-every", "-1"], capsys, "--checkpoint-every")

    bare = interrupted.parent / ".bare.partial-0123abcd"
    bare.mkdir()
    refused(["--resume", str(bare)], capsys, "has no checkpoint")

    fd = os.open(interrupted, os.O_RDONLY)  # a process still running this folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        refused(["--resume", str(interrupted)], capsys, "in use by a running process")
    finally:
        os.close(fd)

    config = interrupted / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("lr: 0.05", "lr: 0.06"))
    refused(["--resume", str(interrupted)], capsys, "another config")
    config.write_text(original)

    interactions = tmp_path / "data" / "interactions.csv"  # the data the interrupted run trained on
    lines = interactions.read_text().splitlines(keepends=True)
    interactions.write_text("".join(lines[:-5]))
    refused(["--resume", str(interrupted)], capsys, "other data")
    assert (interrupted / CHECKPOINT_DIR / "state.pt").is_file()  # every refusal leaves the folder as it was
    interactions.write_text("".join(lines))
    assert cli.main(["train", "--resume", str(interrupted), "--quiet"]) == 0


# --------------------------------------------------------------------------- sweep killed with SIGKILL

SWEEP_TIMING = ("s_per_round",)


def _sweep_spec(folder: Path) -> Path:
    """Two real cells (FedRAP without DP and under central DP), reproducible secrets, 3 rounds."""
    spec = folder / "spec.yaml"
    spec.write_text(
        "name: killed\n"
        f"base: [{REPO / 'configs' / 'fedrap.yaml'}]\n"
        "set:\n  secrets: reproducible\n  train.selection: last\n  train.local_epochs: 1\n  train.batch_size: 32\n"
        "  model.latent_dim: 8\n  privacy.delta: 1.0e-3\n  privacy.clip: 0.5\n"
        "rounds: 3\n"
        "axes:\n  privacy.epsilon: [.inf, 4]\n  privacy.mechanism: [central]\n"
        "seeds: [0]\n"
        "attacks: null\n"
        "references: []\n"
    )
    return spec


def _sweep_rows(out: Path) -> list[dict[str, Any]]:
    from evaluations.sweep_report import collect_rows

    rows, diverged = collect_rows(out)
    assert not diverged
    return [{k: v for k, v in row.items() if k not in SWEEP_TIMING} for row in rows]


def test_killed_sweep_resumes_to_the_uninterrupted_results(data_folder: Path, tmp_path: Path, capsys) -> None:
    spec = _sweep_spec(tmp_path)
    out = tmp_path / "killed"
    argv = ["sweep", str(spec), "--out", str(out), "--data", str(data_folder), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "gfmfr_secure", *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            cells = out / "cells"
            done = [p for p in cells.iterdir() if not p.name.startswith(".")] if cells.is_dir() else []
            if done:  # the first cell is finished: kill the sweep while the second one trains
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the sweep ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
    assert not (out / "report.md").exists()

    capsys.readouterr()
    assert cli.main(argv) == 0  # resumes: the finished cell is kept, any partial one redone
    assert "1 cells run, 1 already finished, 2 in all" in capsys.readouterr().out
    assert not list((out / "cells").glob(".*"))
    assert cli.main(argv) == 0  # a third run trains nothing
    assert "0 cells run, 2 already finished, 2 in all" in capsys.readouterr().out

    whole = tmp_path / "whole"
    assert cli.main(["sweep", str(spec), "--out", str(whole), "--data", str(data_folder), "--quiet"]) == 0
    assert _sweep_rows(out) == _sweep_rows(whole)
    assert (out / "report.md").is_file()
