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
from evaluations.sweep_report import collect_rows
from gfmfr_secure import cli

REPO = Path(__file__).resolve().parents[1]
RUNNER = "gfmfr_secure.simulation.runner"
REPORT_FILES = ("results.csv", "results.json", "report.md", "utility_vs_epsilon.png", "utility_vs_epsilon.svg", "cost.png", "cost.svg")


def run_training(cfg, run, *, progress=True, keep_model=True, **options):
    """Stand-in for the runner's run_training: metrics are a function of the config.

    Module level, so spawned worker processes import it (``run_sweep(runner=__name__)``).
    """
    if keep_model:
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


def check_method(cfg):
    return None


class CountingRunner:
    """The stand-in runner, counting the cells it trains in this process."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run_training(self, cfg, run, *, progress=True, **options):
        self.calls.append(run.name)
        return run_training(cfg, run, progress=progress, **options)


@pytest.fixture
def runner(monkeypatch):
    fake = CountingRunner()
    module = types.ModuleType(RUNNER)
    module.run_training = fake.run_training
    module.check_method = check_method
    monkeypatch.setitem(sys.modules, RUNNER, module)
    return fake


def _spec(tmp_path: Path, **extra) -> Path:
    body = {
        "name": "t",
        "base": [str(REPO / "configs" / "fedrap.yaml")],
        "set": {"train.selection": "last"},
        "axes": {"privacy.epsilon": [".inf", 2], "privacy.mechanism": ["central"], "aggregation.backend": ["plain", "ckks"]},
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
        ({"exclude": [{"privacy.clip": 1}]}, "'exclude[0].privacy.clip'", "use one of"),
        ({"exclude": [{"aggregation.backend": "masking"}]}, "'exclude[0].aggregation.backend'", "listed under axes"),
        ({"exclude": {"aggregation.backend": "plain"}}, "'exclude'", "write e.g."),
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
    assert len(paper) == 3 * ((1 + 4 * 3) + (1 + 4 * 2))  # seeds x (plain: all mechanisms; masking: no central)
    assert not [c for c in paper if c.config.privacy.mechanism == "central" and c.config.aggregation.backend == "masking"]
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

    again = run_sweep(load_spec(spec), out, data=str(data_dir), progress=False)  # trains nothing, rewrites no cell
    assert len(runner.calls) == 4 and len(again.skipped) == 4 and again.ran == []
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*")} == mtimes


def test_interrupted_sweep_resumes_and_matches_an_uninterrupted_one(runner, data_dir, tmp_path) -> None:
    spec = load_spec(_spec(tmp_path, seeds=[0, 1]))
    whole = run_sweep(spec, tmp_path / "whole", data=str(data_dir), progress=False)

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
    assert len(collect_rows(out)[0]) == 2  # the report reads only finished cells

    calls = len(runner.calls)
    resumed = run_sweep(spec, out, data=str(data_dir), progress=False)
    assert len(resumed.skipped) == 2 and len(runner.calls) - calls == len(whole.cells) - 2
    assert not list((out / "cells").glob(".*partial*"))
    assert collect_rows(out) == collect_rows(tmp_path / "whole")


def test_parallel_workers_resume_to_the_same_results(runner, data_dir, tmp_path) -> None:
    """--jobs 2: spawned processes run the cells; a cell killed mid-run is redone, the rest kept."""
    spec, out = load_spec(_spec(tmp_path)), tmp_path / "out"
    first = run_sweep(spec, out, data=str(data_dir), jobs=2, progress=False, runner=__name__)
    assert sorted(first.ran) == sorted(c.name for c in first.cells) and len(first.ran) == 4
    rows = collect_rows(out)
    killed = first.cells[1].name
    (out / "cells" / killed).rename(out / "cells" / f".{killed}.partial-dead")
    again = run_sweep(spec, out, data=str(data_dir), jobs=2, progress=False, runner=__name__)
    assert again.ran == [killed] and len(again.skipped) == 3
    assert collect_rows(out) == rows


def test_a_changed_spec_does_not_reuse_cells(runner, data_dir, tmp_path) -> None:
    out = tmp_path / "out"
    run_sweep(load_spec(_spec(tmp_path)), out, data=str(data_dir), progress=False)
    with pytest.raises(SweepError, match="different config"):
        run_sweep(load_spec(_spec(tmp_path, rounds=3)), out, data=str(data_dir), progress=False)


def _fake_attacks(cfg, views, attacks):
    auc = 0.5 + (0.4 if cfg.privacy.mechanism == "none" else 0.1)
    return [
        {"attack": "interaction-magnitude", "adversary": "server", "round": attacks.round, "n_targets": 10, "metrics": {"auc": auc + 0.01 * cfg.seed, "tpr_at_fpr_0.01": auc / 10}},
        {"attack": "interaction-reconstruction", "adversary": "server", "round": attacks.round, "n_targets": 10, "metrics": {"exact_recovery": auc - 0.5}},
        {"attack": "group-inference", "adversary": "outsider", "round": attacks.round, "n_targets": 10, "metrics": {"auc": 0.55}},
    ]


def test_report_regenerates_from_finished_cells_only(runner, data_dir, tmp_path, capsys, monkeypatch) -> None:
    import evaluations.sweep as sweep

    import evaluations.sweep_report as sweep_report

    monkeypatch.setattr(sweep, "_attack", _fake_attacks)
    monkeypatch.setattr(sweep_report, "_MAX_SERIES_PER_ATTACK", 1)  # the attack plot draws each series' strongest attack
    out = tmp_path / "out"
    run_sweep(load_spec(_spec(tmp_path, seeds=[0, 1], attacks={"round": 1})), out, data=str(data_dir), progress=False)
    assert all(c.config.record.views_rounds == (1,) for c in expand_cells(load_spec(_spec(tmp_path, attacks={"round": 1})), str(data_dir)))
    (out / ".stale").mkdir()
    (out / "cells" / ".epsilon-2_seed-0.partial-1234").mkdir()
    files = (*REPORT_FILES, "attacks_vs_epsilon.png", "attacks_vs_epsilon.svg", "frontier.png", "frontier.svg")
    for name in files:
        (out / name).unlink(missing_ok=True)
    assert cli.main(["report", str(out)]) == 0
    for name in files:
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "8 finished cells (4 configurations)" in report and "![frontier](frontier.png)" in report
    assert "| interaction-magnitude | server | 0.9050 ± 0.0071 | 0.0900 ± 0.0000 | - |" in report
    rows = json.loads((out / "results.json").read_text())
    assert sorted({round(r["attack:interaction-reconstruction:server:exact_recovery"], 9) for r in rows}) == [0.1, 0.4]
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "no sweep cells" in capsys.readouterr().err



def test_a_method_axis_brings_the_settings_its_name_implies(data_dir, tmp_path) -> None:
    spec = load_spec(_spec(tmp_path, set={"train.selection": "last", "grouping.method": "oblivious"}, axes={"method": ["fedrap", "gfmfr"]}))
    cells = {c.axes["method"]: c.config for c in expand_cells(spec, str(data_dir))}
    assert (cells["fedrap"].distill.enabled, cells["gfmfr"].distill.enabled) == (False, True)
    assert cells["gfmfr"].model.backbone == "fedrap" and cells["gfmfr"].grouping.method == "oblivious"


def test_a_cell_still_run_by_an_orphaned_worker_is_not_touched(runner, data_dir, tmp_path) -> None:
    import fcntl

    from evaluations.sweep import CELLS_DIR

    spec, out = load_spec(_spec(tmp_path)), tmp_path / "out"
    name = expand_cells(spec, str(data_dir))[0].name
    (out / CELLS_DIR).mkdir(parents=True)
    partial = out / CELLS_DIR / f".{name}.partial-live"
    partial.mkdir()
    (out / ".locks").mkdir()
    with open(out / ".locks" / f"{name}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SweepError, match="still being run by another process"):
            run_sweep(spec, out, data=str(data_dir), progress=False)
    assert partial.is_dir() and runner.calls == []


def test_help_lists_the_options(capsys) -> None:
    for argv, words in ((["sweep", "--help"], ["--out", "--data", "--jobs", "example:"]), (["report", "--help"], ["DIR", "example:"])):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert all(w in text for w in words)


def test_a_diverged_cell_is_kept_as_a_result_and_listed(runner, data_dir, tmp_path, monkeypatch) -> None:
    def diverge_at_eps2(cfg, run, *, progress=True, **options):
        if cfg.privacy.mechanism == "central":
            raise FloatingPointError("round 1: local training diverged")
        return run_training(cfg, run, **options)

    monkeypatch.setattr(sys.modules[RUNNER], "run_training", diverge_at_eps2)
    out = tmp_path / "out"
    spec = load_spec(_spec(tmp_path, axes={"privacy.epsilon": [".inf", 2], "privacy.mechanism": ["central"]}))
    run_sweep(spec, out, data=str(data_dir), progress=False)
    folder = out / "cells" / "epsilon-2_mechanism-central_seed-0"
    assert (folder / "diverged.json").is_file() and not (folder / "metrics.json").exists()
    assert run_sweep(spec, out, data=str(data_dir), progress=False).ran == []  # a result: not redone
    rows, diverged = collect_rows(out)
    assert [r["cell"] for r in rows] == ["epsilon-inf_mechanism-none_seed-0"]
    assert diverged[0]["error"] == "round 1: local training diverged"


def test_configs_lists_presets_with_one_line_each(tmp_path, capsys) -> None:
    assert cli.main(["configs", "--dir", str(REPO / "configs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    quick = next(line for line in lines if line.split()[0].endswith("sweeps/quick.yaml"))
    assert quick.split(None, 1)[1] == "Quick privacy-utility sweep: FedRAP under central user-level DP at three budgets and without, three seeds."
    assert any(line.split()[0].endswith("configs/gfmfr.yaml") for line in lines)
    assert cli.main(["configs", "--dir", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
