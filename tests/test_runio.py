"""Run folders: atomic commit, cleanup on failure, no overwrite, atomic files, environment."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat

import numpy as np
import pytest
import torch

from gfmfr_secure.errors import GfmfrError
from gfmfr_secure.runio import (
    RunExistsError,
    create_run,
    cxx_compiler_version,
    default_run_name,
    environment_info,
    git_info,
)


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_folder_appears_under_its_name_only_on_clean_exit(tmp_path):
    out = tmp_path / "runs"
    with create_run(out, "exp1") as run:
        assert run.dir.parent == out
        assert re.fullmatch(r"\.exp1\.partial-.+", run.dir.name)
        assert not (out / "exp1").exists()
        run.write_json("metrics.json", {"HR@10": 0.5})
        run.write_text("config.yaml", "seed: 0\n")
        run.logger.info("hello from the run")
        partial = run.dir
    assert listing(out) == ["exp1"]
    assert not partial.exists()
    assert run.dir == out / "exp1"
    assert listing(run.dir) == ["config.yaml", "log.txt", "metrics.json"]
    assert json.loads(run.path("metrics.json").read_text()) == {"HR@10": 0.5}
    assert "hello from the run" in run.path("log.txt").read_text()


def test_partial_folder_is_removed_and_exception_reraised(tmp_path):
    with pytest.raises(KeyError, match="boom"), create_run(tmp_path, "exp") as run:
        run.write_json("metrics.json", {"x": 1})
        raise KeyError("boom")
    assert listing(tmp_path) == []
    assert run.logger.handlers == []


def test_keyboard_interrupt_also_cleans_up(tmp_path):
    with pytest.raises(KeyboardInterrupt), create_run(tmp_path, "exp"):
        raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_existing_run_is_never_overwritten(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "metrics.json").write_text("{}")
    with pytest.raises(RunExistsError, match="already exists"), create_run(tmp_path, "exp"):
        pytest.fail("the block must not run")
    assert listing(tmp_path) == ["exp"]
    assert listing(tmp_path / "exp") == ["metrics.json"]


def test_folder_created_during_the_run_is_not_replaced(tmp_path):
    expected = pytest.raises(RunExistsError, match="appeared while the run was in progress")
    with expected as info, create_run(tmp_path, "exp") as run:
        run.write_json("metrics.json", {"x": 1})
        partial = run.dir
        (tmp_path / "exp").mkdir()  # even an empty folder would be silently replaced by rename
    assert str(partial) in str(info.value)
    assert (partial / "metrics.json").exists()  # results kept where the message says
    assert listing(tmp_path / "exp") == []


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with create_run(tmp_path, "exp") as run:
            run.write_json("metrics.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "exp").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "exp" / "metrics.json").stat().st_mode) == 0o644


def test_run_exists_error_is_a_library_error():
    assert issubclass(RunExistsError, GfmfrError)
    assert issubclass(RunExistsError, FileExistsError)


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", ".."])
def test_bad_run_names_are_rejected(tmp_path, name):
    with pytest.raises(GfmfrError, match="run name"):
        create_run(tmp_path, name)


def test_default_name_has_method_utc_time_and_seed(tmp_path):
    when = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert default_run_name("gfmfr", 3, when) == "gfmfr-20250304T030607Z-seed3"
    run = create_run(tmp_path, method="fedrap", seed=1)
    assert re.fullmatch(r"fedrap-\d{8}T\d{6}Z-seed1", run.name)


def test_write_json_is_atomic_and_handles_array_values(tmp_path):
    with create_run(tmp_path, "exp") as run:
        run.write_json("m.json", {"a": 1})
        run.write_json(
            "m.json", {"np": np.float32(0.5), "arr": np.arange(3), "t": torch.tensor([1, 2])}
        )
        run.write_json("sub/deep.json", [1])
        assert listing(run.dir) == ["log.txt", "m.json", "sub"]  # no temporary files left
        with pytest.raises(TypeError, match="not JSON serialisable"):
            run.write_json("bad.json", {"x": object()})
        assert not any(p.name.startswith(".bad.json") for p in run.dir.iterdir())
    assert json.loads((run.dir / "m.json").read_text()) == {
        "np": 0.5,
        "arr": [0, 1, 2],
        "t": [1, 2],
    }


@pytest.mark.parametrize("name", ["../escape.json", "/etc/passwd"])
def test_paths_stay_inside_the_run(tmp_path, name):
    expected = pytest.raises(GfmfrError, match="relative path inside the run folder")
    with create_run(tmp_path, "exp") as run, expected:
        run.path(name)


def test_logger_writes_the_file_and_optionally_the_console(tmp_path, capsys):
    with create_run(tmp_path, "quiet") as run:
        run.logger.info("silent line")
    assert capsys.readouterr().err == ""
    with create_run(tmp_path, "loud", console=True) as run:
        run.logger.info("loud line")
    assert "loud line" in capsys.readouterr().err
    assert "loud line" in (tmp_path / "loud" / "log.txt").read_text()


def test_environment_info_lists_versions_and_revision():
    info = environment_info()
    assert info["python"].count(".") == 2
    assert info["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    for dist in ("gfmfr-secure", "numpy", "pandas", "scikit-learn", "scipy"):
        assert dist in info["packages"]
    revision = info["git"]["revision"]
    assert revision == "unknown" or re.fullmatch(r"[0-9a-f]{40}", revision)
    assert info["git"]["dirty"] in (True, False, None)
    json.dumps(info)  # serialisable as it is


def test_git_info_outside_a_checkout_is_unknown(tmp_path):
    assert git_info(tmp_path) == {"revision": "unknown", "dirty": None}


def test_cxx_compiler_version_follows_cxx(monkeypatch, tmp_path):
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake-c++ 9.9 (test)'\necho second line\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert cxx_compiler_version() == "fake-c++ 9.9 (test)"
    monkeypatch.setenv("CXX", str(tmp_path / "missing"))
    assert cxx_compiler_version() is None
