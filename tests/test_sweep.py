"""gfmfr-secure sweep / report: spec validation, cells as atomic run folders, resume, report."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import yaml

from evaluations.sweep import SweepError, expand_cells, load_spec, run_sweep, spec_from_dict
from evaluations.sweep_report import write_report
from gfmfr_secure import cli
from gfmfr_secure.config import DATA_ENV_VAR

REPO = Path(__file__).resolve().parents[1]
RUNNER = "gfmfr_secure.simulation.runner"
REPORT_FILES = ("results.csv", "results.json", "report.md", "utility_vs_epsilon.png", "utility_vs_epsilon.svg", "cost.png", "cost.svg")


class CountingRunner:
    """Stand-in for the runner: metrics are a function of the config; every call is counted."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def check_method(self, cfg):
        return None

    def run_training(self, cfg, run, *, progress=True):
        self.calls.append(run.name)
        run.path("model.pt").write_bytes(b"weights")
        eps = cfg.privacy.epsilon if cfg.privacy.mechanism != "none" else math.inf
        ndcg = 0.3 - (0.1 / eps if math.isfinite(eps) else 0.0) + 0.01 * cfg.seed
        return {
            "test": {"NDCG@10": ndcg, "HR@10": 2 * ndcg},
            "val": {"NDCG@10": ndcg},
            "privacy": {"mechanism": cfg.privacy.mechanism, "epsilon": None if math.isinf(eps) else eps},
            "timing": {"client_s_per_round": 0.5, "server_s_per_round": 0.1},
            "cost": {"bytes_up_per_client": 100.0 if cfg.aggregation.backend == "plain" else 300.0},
        }


@pytest.fixture
def runner(monkeypatch):
    fake = CountingRunner()
    module = types.ModuleType(RUNNER)
    module.run_training = fake.run_training
    module.check_method = fake.check_method
    monkeypatch.setitem(sys.modules, RUNNER, module)
    return fake


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    folder = tmp_path / "dataset"
    folder.mkdir()
    return folder


def _spec(tmp_path: Path, **extra) -> Path:
    body = {
        "name": "t",
        "base": [str(REPO / "configs" / "fedrap.yaml")],
        "set": {"train.selection": "last"},
        "axes": {"privacy.epsilon": [".inf", 2], "privacy.mechanism": ["central"], "aggregation.backend": ["plain", "masking"]},
        "seeds": [0],
        "rounds": 2,
        "references": [],
        **extra,
    }
    text = yaml.safe_dump(body).replace("'.inf'", ".inf")
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("patch", "key", "fix"),
    [
        ({"bogus": 1}, "'bogus'", "valid keys"),
        ({"base": "no-such.yaml"}, "'base'", "relative to the spec file"),
        ({"axes": {"privacy.epsilon": []}}, "'axes.privacy.epsilon'", "write e.g."),
        ({"axes": {"privacy.epsilon": [2, 2]}}, "'axes.privacy.epsilon'", "list each value once"),
        ({"axes": {"seed": [1, 2]}}, "'axes.seed'", "'seeds'"),
        ({"seeds": [0, -1]}, "'seeds'", "write e.g."),
        ({"rounds": 0}, "'rounds'", "write e.g."),
        ({"attacks": {"round": 5}}, "'attacks.round'", "0..1"),
        ({"attacks": {"rnd": 0}}, "'attacks'", "imia_clients"),
        ({"references": ["oracle"]}, "'references'", "popularity"),
        ({"keep": {"model": "yes"}}, "'keep.model'", "false"),
    ],
)
def test_spec_errors_name_the_key_and_the_fix(tmp_path, patch, key, fix) -> None:
    data = yaml.safe_load(_spec(tmp_path).read_text())
    data.update(patch)
    with pytest.raises(SweepError) as err:
        spec_from_dict(data, "spec.yaml", tmp_path)
    assert key in str(err.value) and fix in str(err.value)


@pytest.mark.parametrize(
    ("axes", "key"),
    [
        ({"privacy.epsilonn": [1]}, "axes.privacy.epsilonn"),  # unknown config key
        ({"privacy.mechanism": ["loud"]}, "axes.privacy.mechanism"),  # invalid choice
        ({"privacy.epsilon": [-1], "privacy.mechanism": ["central"]}, "axes.privacy.epsilon"),  # out of range
    ],
)
def test_cells_with_invalid_configs_are_errors_naming_the_axis(runner, data_dir, tmp_path, axes, key) -> None:
    spec = spec_from_dict({**yaml.safe_load(_spec(tmp_path).read_text()), "axes": axes}, "spec.yaml", tmp_path)
    with pytest.raises(SweepError, match=key):
        expand_cells(spec, str(data_dir))


def test_cli_spec_error_exits_2_without_traceback(tmp_path, data_dir, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [nowhere.yaml]\n")
    assert cli.main(["sweep", str(bad), "--out", str(tmp_path / "o"), "--data", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep spec key 'base'") and "Traceback" not in err
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    assert cli.main(["sweep", str(binary), "--out", str(tmp_path / "o")]) == 2
    assert "not a text" in capsys.readouterr().err


def test_non_private_cells_merge_and_presets_expand(runner, data_dir, tmp_path) -> None:
    spec = load_spec(_spec(tmp_path, axes={"privacy.epsilon": [".inf", 8], "privacy.mechanism": ["central", "local"]}))
    names = [c.name for c in expand_cells(spec, str(data_dir))]
    assert names == ["epsilon-inf_mechanism-none_seed-0", "epsilon-8_mechanism-central_seed-0", "epsilon-8_mechanism-local_seed-0"]
    paper = expand_cells(load_spec(REPO / "configs" / "sweeps" / "paper.yaml"), str(data_dir))
    assert len(paper) == 3 * 2 * (1 + 4 * 3)  # seeds x backends x (non-private + epsilons x mechanisms)
    quick = expand_cells(load_spec(REPO / "configs" / "sweeps" / "quick.yaml"), str(data_dir))
    for cell in paper + quick:
        assert cell.config.train.selection == "last" and cell.config.train.weighting == "uniform"
        assert cell.config.grouping.method in ("oblivious", "none")


# --------------------------------------------------------------------------- sweep and resume


def test_sweep_writes_every_cell_and_the_report_then_skips_them(runner, data_dir, tmp_path, capsys) -> None:
    spec, out = _spec(tmp_path), tmp_path / "out"
    argv = ["sweep", str(spec), "--out", str(out), "--data", str(data_dir), "--quiet"]
    assert cli.main(argv) == 0
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert len(runner.calls) == 4 and cells == sorted(runner.calls)
    for name in cells:
        folder = out / "cells" / name
        assert {"config.yaml", "run.json", "metrics.json", "cell.json", "log.txt"} <= {p.name for p in folder.iterdir()}
        assert not (folder / "model.pt").exists()  # keep.model defaults to false
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 4 and {r["mechanism"] for r in rows} == {"none", "central"}
    assert "4 cells run, 0 already finished" in capsys.readouterr().out
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*")}

    assert cli.main(argv) == 0  # a second run trains nothing and rewrites no cell
    assert len(runner.calls) == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*")} == mtimes
    assert "0 cells run, 4 already finished" in capsys.readouterr().out


def test_interrupted_sweep_resumes_and_matches_an_uninterrupted_one(runner, data_dir, tmp_path) -> None:
    spec = load_spec(_spec(tmp_path, seeds=[0, 1]))
    whole = run_sweep(spec, tmp_path / "whole", data=str(data_dir), progress=False)
    write_report(tmp_path / "whole")

    out = tmp_path / "cut"
    third = whole.cells[2].name

    def kill(name: str) -> None:
        if name == third:  # killed with -9 in the middle of the third cell: only its partial folder remains
            partial = out / "cells" / f".{name}.partial-dead"
            partial.mkdir()
            (partial / "metrics.json").write_text('{"test": {"NDCG')
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, data=str(data_dir), progress=False, on_cell=kill)
    assert len(list((out / "cells").iterdir())) == 3  # two finished cells and the partial one
    write_report(out)  # the report reads only finished cells
    assert len(json.loads((out / "results.json").read_text())) == 2

    calls = len(runner.calls)
    resumed = run_sweep(spec, out, data=str(data_dir), progress=False)
    assert len(resumed.skipped) == 2 and len(runner.calls) - calls == len(whole.cells) - 2
    assert not list((out / "cells").glob(".*partial*"))
    write_report(out)
    assert (out / "results.csv").read_text() == (tmp_path / "whole" / "results.csv").read_text()


def test_a_changed_spec_does_not_reuse_cells(runner, data_dir, tmp_path) -> None:
    out = tmp_path / "out"
    run_sweep(load_spec(_spec(tmp_path)), out, data=str(data_dir), progress=False)
    with pytest.raises(SweepError, match="different config"):
        run_sweep(load_spec(_spec(tmp_path, rounds=3)), out, data=str(data_dir), progress=False)


def test_report_regenerates_from_finished_cells_only(runner, data_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    run_sweep(load_spec(_spec(tmp_path)), out, data=str(data_dir), progress=False)
    (out / ".stale").mkdir()
    (out / "cells" / ".epsilon-2_seed-0.partial-1234").mkdir()
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    assert cli.main(["report", str(out)]) == 0
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "4 finished cells (4 configurations)" in report and "![utility_vs_epsilon](utility_vs_epsilon.png)" in report
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "no sweep cells" in capsys.readouterr().err
