"""Run folders that are either complete or absent.

A run writes into a hidden partial folder ``out_dir/.<name>.partial-XXXX/``;
only when the ``with`` block exits cleanly is that folder renamed, in one
``os.rename``, to ``out_dir/<name>``. If the block raises, the partial folder
is deleted and the exception propagates, unless it holds the path named by
``keep_on_error`` (a checkpoint): then it is kept, and :meth:`RunFolder.reopen`
continues it later. Files inside are written through a temporary file and
:func:`os.replace`, so no reader ever sees half a file::

    with create_run("runs", method="gfmfr", seed=0) as run:
        run.logger.info("round %d", 1)
        run.write_json("metrics.json", {"test": {"HR@10": 0.1}})
    print(run.dir)   # runs/gfmfr-20250101T000000Z-seed0

:func:`environment_info` records what a run was computed with.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import gfmfr_secure
from gfmfr_secure.console import ProgressLogHandler
from gfmfr_secure.errors import GfmfrError

__all__ = [
    "RunExistsError",
    "RunFolder",
    "create_run",
    "cxx_compiler_version",
    "default_run_name",
    "environment_info",
    "git_info",
    "partial_run_name",
    "utc_now",
]

#: Packages always reported by :func:`environment_info` ("not installed" if absent).
CORE_PACKAGES = ("gfmfr-secure", "torch", "numpy", "numba", "pandas", "scikit-learn", "scipy")
#: Packages reported only when installed.
OPTIONAL_PACKAGES = ("opacus", "tenseal", "flwr", "sentence-transformers")

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

#: name of a partial run folder: ``.<name>.partial-<8 hex digits>``
_PARTIAL_NAME = re.compile(r"\.(?P<name>[^/]+)\.partial-[0-9a-f]{8}")


class RunExistsError(GfmfrError, FileExistsError):
    """The final run folder already exists; runs are never overwritten."""


def utc_now() -> _dt.datetime:
    """The current time, timezone-aware UTC."""
    return _dt.datetime.now(_dt.UTC)


def default_run_name(method: str, seed: int, now: _dt.datetime | None = None) -> str:
    """``<method>-<UTC timestamp>-seed<seed>``, e.g. ``gfmfr-20250101T120000Z-seed0``."""
    stamp = (now or utc_now()).astimezone(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{method}-{stamp}-seed{seed}"


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or os.sep in name:
        raise GfmfrError(
            f"run name {name!r} is not a plain folder name (non-empty, no '/', no leading '.')"
        )


def partial_run_name(folder: str | os.PathLike[str]) -> str | None:
    """The final run name a partial folder ``.<name>.partial-XXXXXXXX`` will get; None for other names."""
    match = _PARTIAL_NAME.fullmatch(Path(folder).name)
    return None if match is None else match["name"]


def _json_default(obj: Any) -> Any:
    """Turn numpy / torch scalars and arrays, paths and sets into JSON values."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, _dt.datetime):
        return obj.isoformat()
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        return tolist()
    raise TypeError(f"value of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


class RunFolder:
    """A run directory that appears under its final name only when complete.

    Use through :func:`create_run`. Inside the ``with`` block, :attr:`dir` is
    the partial folder; after a clean exit it is the final folder.

    Attributes
    ----------
    out_dir : Path
        Parent folder of the run.
    name : str
        Final folder name.
    final_dir : Path
        ``out_dir / name``.
    logger : logging.Logger
        Writes ``log.txt`` inside the run (and to stderr when ``console``).
    started_at : datetime or None
        UTC time the folder was created.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        name: str,
        *,
        console: bool = False,
        keep_on_error: str | None = None,
    ) -> None:
        _check_name(name)
        self.out_dir = Path(out_dir)
        self.name = name
        self.final_dir = self.out_dir / name
        self.started_at: _dt.datetime | None = None
        self._console = console
        self._keep_on_error = keep_on_error
        self._reopen: Path | None = None
        self._partial: Path | None = None
        self._committed = False
        # A logger of its own, not registered with logging's manager: nothing
        # outlives the run, and two runs never share handlers.
        self.logger = logging.Logger(f"gfmfr_secure.run.{name}")  # noqa: LOG001

    @classmethod
    def reopen(
        cls, partial: str | os.PathLike[str], *, console: bool = False, keep_on_error: str | None = None
    ) -> RunFolder:
        """A run folder continuing the partial folder ``partial`` (``.<name>.partial-XXXXXXXX``).

        On entering, files already in the folder stay and ``log.txt`` is appended
        to; on a clean exit the folder is renamed to its final name as usual; if the
        block raises, the folder is kept (never deleted).

        Raises
        ------
        GfmfrError
            If ``partial`` is not named like a partial run folder.
        """
        path = Path(partial)
        name = partial_run_name(path)
        if name is None:
            raise GfmfrError(f"{str(path)!r} is not a partial run folder (.<name>.partial-XXXXXXXX)")
        run = cls(path.parent, name, console=console, keep_on_error=keep_on_error)
        run._reopen = path
        return run

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> Self:
        if self._partial is not None or self._committed:
            raise RuntimeError(f"run folder {self.name!r} was already entered once")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(self.final_dir):
            raise RunExistsError(
                f"run folder {str(self.final_dir)!r} already exists; choose another name"
            )
        if self._reopen is not None:
            if not self._reopen.is_dir():
                raise GfmfrError(f"partial run folder {str(self._reopen)!r} does not exist")
            partial = self._reopen
        else:
            # os.mkdir (unlike tempfile.mkdtemp) honours the umask, so results are
            # as readable as any other file the user writes.
            partial = self.out_dir / f".{self.name}.partial-{secrets.token_hex(4)}"
            os.mkdir(partial)
        self._partial = partial
        self.started_at = utc_now()
        self._setup_logger()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        partial = self._partial
        if partial is None:
            raise RuntimeError(f"run folder {self.name!r} exited without being entered")
        checkpointed = self._keep_on_error is not None and (partial / self._keep_on_error).exists()
        if exc is not None and (checkpointed or self._reopen is not None):  # a reopened folder is never deleted
            self.logger.error(
                "run stopped (%s); the partial folder %s is kept%s",
                type(exc).__name__, partial,
                f": continue it with 'gfmfr-secure train --resume {partial}'" if checkpointed else "",
            )
            self._close_logger()
            self._partial = None
            return  # the exception propagates
        self._close_logger()
        if exc is not None:
            shutil.rmtree(partial, ignore_errors=True)
            self._partial = None
            return  # the exception propagates
        self._commit(partial)

    def _commit(self, partial: Path) -> None:
        # os.rename would silently replace an empty directory of the same name;
        # refuse instead, and keep the results where the user can find them.
        if os.path.lexists(self.final_dir):
            raise RunExistsError(
                f"run folder {str(self.final_dir)!r} appeared while the run was in progress; "
                f"its results are kept in {str(partial)!r}"
            )
        os.rename(partial, self.final_dir)
        self._partial = None
        self._committed = True

    def _setup_logger(self) -> None:
        assert self._partial is not None
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        handler = logging.FileHandler(self._partial / "log.txt", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        self.logger.addHandler(handler)
        if self._console:
            stream = ProgressLogHandler(sys.stderr)
            stream.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(stream)

    def _close_logger(self) -> None:
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)

    # -- files -----------------------------------------------------------------

    @property
    def dir(self) -> Path:
        """The folder to write into now: partial while running, final once committed."""
        if self._partial is not None:
            return self._partial
        if self._committed:
            return self.final_dir
        raise RuntimeError(f"run folder {self.name!r} is not open (use it in a 'with' block)")

    def path(self, name: str) -> Path:
        """Path of ``name`` (relative, may contain subfolders) inside the run folder."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise GfmfrError(
                f"run file name {name!r} must be a relative path inside the run folder"
            )
        return self.dir / rel

    def write_text(self, name: str, text: str) -> Path:
        """Write ``text`` to ``name`` atomically (temporary file, then ``os.replace``)."""
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        replaced = False
        try:
            with open(tmp, "x", encoding="utf-8") as fh:  # exclusive create, honours the umask
                fh.write(text)
            os.replace(tmp, target)
            replaced = True
        finally:
            if not replaced and os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as indented JSON to ``name`` atomically.

        numpy / torch values become lists or scalars; non-finite floats are
        written as ``Infinity`` / ``NaN`` (as Python's ``json`` reads them).
        """
        text = json.dumps(obj, indent=2, default=_json_default) + "\n"
        return self.write_text(name, text)


def create_run(
    out_dir: str | os.PathLike[str],
    name: str | None = None,
    *,
    method: str = "run",
    seed: int = 0,
    console: bool = False,
    keep_on_error: str | None = None,
) -> RunFolder:
    """A :class:`RunFolder` for ``out_dir/name`` (use it in a ``with`` block).

    Parameters
    ----------
    out_dir : parent folder, created if missing.
    name : final folder name; default :func:`default_run_name` of ``method`` and ``seed``.
    console : also echo the run's log records to stderr.
    keep_on_error : relative path; when the block raises and the partial folder holds
        it (a checkpoint), the partial folder is kept instead of deleted.

    Raises
    ------
    RunExistsError
        On entering, if ``out_dir/name`` already exists.
    """
    return RunFolder(
        out_dir,
        default_run_name(method, seed) if name is None else name,
        console=console,
        keep_on_error=keep_on_error,
    )


# --------------------------------------------------------------------------- environment


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(repo: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=False
        )
    except FileNotFoundError:  # git is not installed
        return None
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_info(repo: Path | None = None) -> dict[str, Any]:
    """Revision and dirty flag of the repository holding this package.

    Returns ``{"revision": "unknown", "dirty": None}`` when the package is not
    inside a git checkout of this project (e.g. installed from a wheel).
    """
    root = repo or Path(gfmfr_secure.__file__).resolve().parent.parent
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return {"revision": "unknown", "dirty": None}
    revision = _git(root, "rev-parse", "HEAD")
    if revision is None:
        return {"revision": "unknown", "dirty": None}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "dirty": None if status is None else bool(status)}


def cxx_compiler_version() -> str | None:
    """First line of ``--version`` of the C++ compiler ``torch.compile`` would use.

    That is ``$CXX`` if set, else the first of ``g++``, ``c++``, ``clang++`` on the
    path (inductor's own order on Linux); None when there is none. Compiled kernels
    round as the compiler vectorises them, so runs with ``fusion.compile`` record it.
    """
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for name in names:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            return None
        lines = proc.stdout.strip().splitlines()
        return lines[0] if proc.returncode == 0 and lines else None
    return None


def environment_info() -> dict[str, Any]:
    """What a run was computed with: Python, platform, package versions, git revision.

    Returns
    -------
    dict
        ``python``, ``implementation``, ``platform``, ``machine``, ``cpu_count``,
        ``packages`` (distribution name -> version; core packages are always
        listed, ``None`` when missing; optional ones only when installed) and
        ``git`` (``revision``, ``dirty``).
    """
    packages: dict[str, str | None] = {dist: _package_version(dist) for dist in CORE_PACKAGES}
    for dist in OPTIONAL_PACKAGES:
        version = _package_version(dist)
        if version is not None:
            packages[dist] = version
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": packages,
        "git": git_info(),
    }
