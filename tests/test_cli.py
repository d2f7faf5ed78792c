"""The gfmfr-secure command line: help texts, train with a stand-in runner, evaluate, data stats."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gfmfr_secure import cli
from gfmfr_secure.config import DATA_ENV_VAR, load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "gfmfr.yaml"
RUNNER = "gfmfr_secure.simulation.runner"


# --------------------------------------------------------------------------- help and registry


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        ([], ["train", "evaluate", "data", "example:"]),
        (
            ["train"],
            [
                "--config",
                "--data",
                "--out",
                "--seed",
                "--set",
                "--name",
                "--quiet",
                "GFMFR_DATA",
                "example:",
            ],
        ),
        (
            ["evaluate"],
            [
                "--data",
                "--scorer",
                "popularity",
                "random",
                "--run",
                "--split",
                "--seed",
                "example:",
            ],
        ),
        (["data"], ["stats", "example:"]),
        (["data", "stats"], ["--data", "--format", "--json", "example:"]),
    ],
)
def test_help_exits_zero_and_lists_options(argv, mentions, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in mentions:
        assert text in out


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "gfmfr_secure", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("gfmfr-secure ")


def test_register_command_refuses_duplicates():
    with pytest.raises(ValueError, match="'train' is already registered"):
        cli.register_command("train")(lambda subparsers: None)


def test_register_command_adds_a_subcommand(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))

    @cli.register_command("hello")
    def _register(subparsers):
        p = subparsers.add_parser("hello", help="say hello")
        p.set_defaults(handler=lambda args: print("hello") or 0)

    assert cli.main(["hello"]) == 0
    assert capsys.readouterr().out == "hello\n"


def test_plugin_modules_are_optional():
    assert not cli._module_exists("gfmfr_secure.no_such_package.cli")
    assert not cli._module_exists("no_such_top_level.cli")
    assert cli._module_exists("gfmfr_secure.config")


# --------------------------------------------------------------------------- train


class FakeRunner:
    """Stand-in for gfmfr_secure.simulation.runner.run_training."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls: list[tuple[object, object, bool]] = []

    def run_training(self, cfg, run, *, progress=True, **options):
        self.calls.append((cfg, run, progress))
        run.logger.info("round 1 of %d", cfg.train.rounds)
        run.write_json("history.json", [{"round": 0}])
        run.path("model.pt").write_bytes(b"weights")
        if self.fail:
            raise RuntimeError("training diverged")
        return {
            "val": {"NDCG@10": 0.5},
            "test": {"HR@10": 0.25, "NDCG@10": 0.125},
            "timing": {"total_s": 1.0},
        }


@pytest.fixture
def fake_runner(monkeypatch):
    runner = FakeRunner()
    module = types.ModuleType(RUNNER)
    module.run_training = runner.run_training
    monkeypatch.setitem(sys.modules, RUNNER, module)
    return runner


def test_train_writes_a_complete_run_folder(fake_runner, data_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    status = cli.main(
        [
            "train",
            "--config",
            str(DEFAULT_CONFIG),
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--seed",
            "7",
            "--set",
            "train.rounds=2",
            "--set",
            "fusion.modalities=[text]",
            "--name",
            "exp",
            "--quiet",
        ]
    )
    assert status == 0
    run_dir = out / "exp"
    assert sorted(p.name for p in out.iterdir()) == ["exp"]  # no partial folder left
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.yaml",
        "history.json",
        "log.txt",
        "metrics.json",
        "model.pt",
        "run.json",
    ]
    cfg = load_config(run_dir / "config.yaml")
    assert (cfg.seed, cfg.train.rounds, cfg.fusion.modalities) == (7, 2, ("text",))
    assert cfg.data.path == str(data_dir)
    assert fake_runner.calls[0][0] == cfg
    assert fake_runner.calls[0][2] is False  # --quiet turns progress bars off

    record = json.loads((run_dir / "run.json").read_text())
    assert record["seed"] == 7
    assert record["command"][1:4] == ["train", "--config", str(DEFAULT_CONFIG)]
    assert record["started_at"] <= record["finished_at"]
    assert "torch" in record["environment"]["packages"]
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["HR@10"] == 0.25
    assert "round 1 of 2" in (run_dir / "log.txt").read_text()

    out_text = capsys.readouterr().out
    assert "HR@10=0.2500" in out_text and "NDCG@10=0.1250" in out_text
    assert str(run_dir) in out_text


def test_train_default_name_and_data_from_environment(fake_runner, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, str(data_dir))
    out = tmp_path / "runs"
    assert cli.main(["train", "--config", str(DEFAULT_CONFIG), "--out", str(out), "--quiet"]) == 0
    (run_dir,) = out.iterdir()
    assert run_dir.name.startswith("gfmfr-") and run_dir.name.endswith("-seed0")
    assert load_config(run_dir / "config.yaml").data.path == str(data_dir)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "train.roundz=3"], "unknown config key 'train.roundz'"),
        (["--set", "train.rounds=zero"], "train.rounds: expected int"),
        ([], "no data folder"),
    ],
)
def test_train_config_errors_exit_2_without_traceback(
    fake_runner, data_dir, tmp_path, capsys, extra, message
):
    status = cli.main(
        ["train", "--config", str(DEFAULT_CONFIG), "--out", str(tmp_path / "runs"), *extra]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    assert fake_runner.calls == []


def test_train_refuses_to_overwrite_a_run(fake_runner, data_dir, tmp_path, capsys):
    argv = [
        "train",
        "--config",
        str(DEFAULT_CONFIG),
        "--data",
        str(data_dir),
        "--out",
        str(tmp_path),
        "--name",
        "same",
        "--quiet",
    ]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err


def test_failed_training_leaves_no_run_folder(monkeypatch, data_dir, tmp_path):
    runner = FakeRunner(fail=True)
    module = types.ModuleType(RUNNER)
    module.run_training = runner.run_training
    monkeypatch.setitem(sys.modules, RUNNER, module)
    out = tmp_path / "runs"
    with pytest.raises(RuntimeError, match="training diverged"):
        cli.main(
            [
                "train",
                "--config",
                str(DEFAULT_CONFIG),
                "--data",
                str(data_dir),
                "--out",
                str(out),
                "--quiet",
            ]
        )
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- evaluate


def tiny_split() -> SimpleNamespace:
    """3 users, 4 items; training counts: item 0 -> 3, item 1 -> 1, item 2 -> 1, item 3 -> 0."""
    return SimpleNamespace(
        n_users=3,
        n_items=4,
        train_indptr=np.array([0, 2, 3, 5], dtype=np.int64),
        train_items=np.array([0, 1, 0, 0, 2], dtype=np.int64),
        val_items=np.array([-1, -1, -1], dtype=np.int64),
        test_items=np.array([2, 1, 3], dtype=np.int64),
    )


@pytest.fixture
def fake_data(monkeypatch):
    """Stand-in data package whose loader returns :func:`tiny_split`."""
    module = types.ModuleType("gfmfr_secure.data")
    seen: dict[str, object] = {}

    def load_dataset(path, *, fmt="auto", duplicates="error"):
        seen.update(path=path, fmt=fmt, duplicates=duplicates)
        return SimpleNamespace(name="tiny")

    def leave_one_out(data, min_interactions=3):
        seen["min_interactions"] = min_interactions
        return tiny_split()

    module.load_dataset = load_dataset
    module.leave_one_out = leave_one_out
    module.describe = lambda data, split: {
        "name": data.name,
        "users": split.n_users,
        "density": 5 / 12,
        "per_user": {"min": 1, "max": 2},
    }
    monkeypatch.setitem(sys.modules, "gfmfr_secure.data", module)
    return seen


def test_evaluate_popularity_golden(fake_data, data_dir, capsys):
    status = cli.main(
        [
            "evaluate",
            "--data",
            str(data_dir),
            "--scorer",
            "popularity",
            "--ks",
            "1",
            "2",
            "--json",
            "--format",
            "csv",
            "--min-interactions",
            "4",
        ]
    )
    assert status == 0
    assert fake_data == {
        "path": str(data_dir),
        "fmt": "csv",
        "duplicates": "error",
        "min_interactions": 4,
    }
    m = json.loads(capsys.readouterr().out)
    # user 0: test item 2 (count 1), items 0 and 1 masked, item 3 (0) below -> rank 0
    # user 1: test item 1 (count 1), item 0 masked, item 2 ties (1)      -> rank 1
    # user 2: test item 3 (count 0), items 0 and 2 masked, item 1 above  -> rank 1
    assert m["users"] == 3
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@2"] == pytest.approx(3 / 3)
    assert m["NDCG@2"] == pytest.approx(
        (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(3)) / 3
    )
    assert m["MRR@2"] == pytest.approx((1 / 1 + 1 / 2 + 1 / 2) / 3)


def test_evaluate_random_prints_a_table(fake_data, data_dir, capsys):
    assert cli.main(["evaluate", "--data", str(data_dir), "--scorer", "random", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "random scorer, split=test, users=3" in out
    for row in ("HR", "NDCG", "Recall", "MRR"):
        assert any(line.startswith(row + " ") for line in out.splitlines())
    assert "@10" in out and "@50" in out


def test_evaluate_run_uses_the_runners_scorer(monkeypatch, tmp_path, capsys):
    module = types.ModuleType(RUNNER)
    split = tiny_split()
    perfect = torch.zeros(3, 4)
    perfect[torch.arange(3), torch.as_tensor(split.test_items)] = 1.0
    module.load_scorer = lambda run_dir: ((lambda users: perfect[users]), split)
    monkeypatch.setitem(sys.modules, RUNNER, module)
    assert cli.main(["evaluate", "--run", str(tmp_path), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["users"] == 3 and m["NDCG@10"] == 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--data", "."], "--scorer"),
        (["evaluate", "--run", "/no/such/run"], "does not exist"),
        (["evaluate", "--run", ".", "--scorer", "random"], "do not combine"),
    ],
)
def test_evaluate_argument_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- data stats


def test_data_stats_table_and_json(fake_data, data_dir, capsys):
    assert cli.main(["data", "stats", "--data", str(data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "tiny"]
    assert ["per_user.max", "2"] in [line.split() for line in lines]
    assert len({re.match(r"\S+\s+", line).end() for line in lines}) == 1  # one value column
    assert cli.main(["data", "stats", "--data", str(data_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_user"] == {"min": 1, "max": 2}


@pytest.mark.dataset
def test_data_stats_on_movielens_100k(ml100k_dir, capsys):
    assert cli.main(["data", "stats", "--data", str(ml100k_dir), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    assert stats["users_with_test"] == 943


@pytest.mark.dataset
def test_data_stats_table_on_movielens_100k(ml100k_dir, capsys):
    assert cli.main(["data", "stats", "--data", str(ml100k_dir)]) == 0
    rows = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert (rows["users"], rows["items"], rows["interactions"]) == ("943", "1682", "100000")
