"""A Flower deployment on one machine: one SuperLink and several SuperNodes on loopback.

Used by the deployment test and by the loopback cost measurement. Every process is
started by this module, writes its log under ``workdir/logs`` and is ended by
:meth:`LoopbackDeployment.close` (also on ``with`` exit): first the process tree
each one grew (Flower's SuperExec and the ``flwr-serverapp`` / ``flwr-clientapp``
processes it launches), then the process itself, SIGTERM first and SIGKILL after a
grace period.

Facts about flwr 1.42 this relies on (read in its source, ``flwr/superlink`` and
``flwr/supernode``):

- ``flower-superlink`` serves its Control, Fleet and Runtime APIs over HTTP on one
  port (``--host``/``--port``, default 127.0.0.1:8000); ``--fleet-api-address`` and
  ``--control-api-address`` are deprecated. With the default ``--isolation
  subprocess`` it starts ``flower-superexec``, which launches one ``flwr-serverapp``
  process per run.
- ``flower-supernode`` connects to the SuperLink's port (``--superlink``) and serves
  its own Runtime API on ``--port`` (default 9094, so every SuperNode on one machine
  needs its own); its SuperExec launches one ``flwr-clientapp`` process per received
  message, and the node keeps ``Context.state`` between those processes.
- ``flwr run APP CONNECTION`` builds a FAB from ``APP`` and submits it to the
  SuperLink named ``CONNECTION`` in ``$FLWR_HOME/config.toml``; it returns once the
  run is submitted. The FAB is unpacked under ``$FLWR_HOME/apps`` on the nodes.
- The SuperLink installs a run's dependencies with ``uv sync`` unless it gets
  ``--disable-runtime-dependency-installation`` (SuperNodes only with
  ``--allow-runtime-dependency-installation``); here the environment that runs the
  test already has them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gfmfr_secure.errors import GfmfrError

__all__ = ["DeploymentError", "LoopbackDeployment", "command_path", "flower_commands_found", "free_port", "node_config_arg", "stage_app"]

#: Environment for every process: no update check, no telemetry, quick task polling.
QUIET_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


class DeploymentError(GfmfrError, RuntimeError):
    """A process of the loopback deployment did not start, or a run did not end as expected."""


def stage_app(repo: str | Path, dest: str | Path) -> Path:
    """Copy the files the FAB carries (``pyproject.toml``, ``gfmfr_secure/**/*.py``, ``configs/**/*.yaml``) to ``dest``.

    ``flwr run`` on the copy builds the same FAB as on the repository (``fab-include`` in
    ``pyproject.toml`` names the same files) without walking the repository's other folders
    (a virtual environment there takes seconds to list). Returns ``dest``.
    """
    repo, dest = Path(repo), Path(dest)
    files = [repo / "pyproject.toml", *sorted((repo / "gfmfr_secure").rglob("*.py")), *sorted((repo / "configs").rglob("*.yaml"))]
    for src in files:
        if "__pycache__" in src.parts:
            continue
        target = dest / src.relative_to(repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return dest


def command_path(name: str) -> str | None:
    """The console script ``name`` beside this interpreter, else on PATH; None when neither has it."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def flower_commands_found() -> bool:
    """Whether ``flower-superlink``, ``flower-supernode`` and ``flwr`` can be started."""
    return all(command_path(n) for n in ("flower-superlink", "flower-supernode", "flwr"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_config_arg(config: Mapping[str, Any]) -> str:
    """``--node-config`` text for ``config``: ``key=value`` pairs, strings double-quoted.

    Raises
    ------
    DeploymentError
        If a string value holds a double quote (Flower's parser cannot take it).
    """
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            if '"' in str(value):
                raise DeploymentError(f"node config value for {key!r} holds a double quote: {value!r}")
            text = f'"{value}"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; empty where /proc is absent)."""
    out = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = entry.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry.parent.name))
    return out


def _tree(pid: int) -> list[int]:
    """``pid``'s descendants, deepest first."""
    found: list[int] = []
    for child in _children(pid):
        found.extend(_tree(child))
        found.append(child)
    return found


def _signal(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class LoopbackDeployment:
    """One ``flower-superlink --insecure`` and ``len(node_configs)`` SuperNodes on 127.0.0.1.

    Parameters
    ----------
    workdir : folder for ``FLWR_HOME`` (``workdir/flwr-home``) and the process logs
        (``workdir/logs``).
    node_configs : one mapping per SuperNode, passed as its ``--node-config``.
    env : extra environment for every process (e.g. ``PYTHONPATH``).
    """

    def __init__(self, workdir: str | Path, node_configs: Sequence[Mapping[str, Any]], env: Mapping[str, str] | None = None):
        self.workdir = Path(workdir)
        self.node_configs = [dict(c) for c in node_configs]
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(self.home), **(env or {})}
        self.link_port = 0
        self.link: subprocess.Popen[bytes] | None = None
        self.nodes: list[subprocess.Popen[bytes] | None] = []
        self._started: list[subprocess.Popen[bytes]] = []
        self._files: list[Any] = []
        self._known: set[int] = set()

    # ----------------------------------------------------------------- processes

    def _bin(self, name: str) -> str:
        return command_path(name) or name

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self._files.append(log)
        proc = subprocess.Popen(
            [self._bin(args[0]), *args[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
            start_new_session=True,
        )
        self._started.append(proc)
        return proc

    def _wait_listening(self, port: int, proc: subprocess.Popen[bytes], name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeploymentError(f"{name} exited with status {proc.returncode}; see {self.logs / (name + '.log')}")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise DeploymentError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {self.logs / (name + '.log')}")

    def start(self, timeout: float = 60.0) -> LoopbackDeployment:
        """Start the SuperLink, wait until it listens, then start the SuperNodes."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.link_port = free_port()
        self.link = self._spawn(
            "superlink",
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.link_port),
             "--disable-runtime-dependency-installation"],
        )
        self._wait_listening(self.link_port, self.link, "superlink", timeout)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.link_port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        for index in range(len(self.node_configs)):
            self.nodes.append(self._start_node(index))
        return self

    def _start_node(self, index: int) -> subprocess.Popen[bytes]:
        args = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.link_port}", "--host", "127.0.0.1",
                "--port", str(free_port())]
        if self.node_configs[index]:
            args += ["--node-config", node_config_arg(self.node_configs[index])]
        return self._spawn(f"supernode-{index}", args)

    def kill_node(self, index: int) -> None:
        """SIGKILL SuperNode ``index`` and every process it started (as a machine that fails would stop)."""
        proc = self.nodes[index]
        if proc is None:
            return
        pids = _tree(proc.pid)
        _signal([proc.pid, *pids], signal.SIGKILL)
        proc.wait()
        self.nodes[index] = None

    def close(self, grace: float = 5.0) -> None:
        """End every process this deployment started and their descendants; close the logs."""
        procs = [p for p in self._started if p.poll() is None]
        trees = {p.pid: _tree(p.pid) for p in procs}
        for proc in procs:
            _signal(trees[proc.pid], signal.SIGTERM)
            _signal([proc.pid], signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in procs:
            # descendants found now or before the SIGTERM (a parent that exited no longer lists them)
            rest = sorted(set(trees[proc.pid]) | set(_tree(proc.pid)))
            _signal(rest, signal.SIGKILL)
            if proc.poll() is None:
                _signal([proc.pid], signal.SIGKILL)
                proc.wait()
        for log in self._files:
            log.close()
        self._files.clear()

    def __enter__(self) -> LoopbackDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- runs

    def flwr(self, args: Sequence[str], timeout: float = 60.0) -> str:
        """Run the ``flwr`` command with this deployment's ``FLWR_HOME``; returns its stdout.

        Raises
        ------
        DeploymentError
            If it exits with a non-zero status.
        """
        done = subprocess.run(
            [self._bin("flwr"), *args], capture_output=True, text=True, env=self.env, cwd=self.workdir, timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise DeploymentError(f"flwr {' '.join(args)} exited with {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done.stdout

    def submit(self, app_dir: str | Path, run_config: Mapping[str, Any] | None = None) -> int:
        """``flwr run app_dir`` on this SuperLink with ``run_config`` overrides; returns the run id."""
        import tomli_w

        args = ["run", str(app_dir), "loopback", "--format", "json"]
        if run_config:
            path = self.workdir / f"run-config-{len(self._known)}.toml"
            path.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
            args += ["--run-config", str(path)]
        out = self.flwr(args)
        reply = json.loads(out[out.index("{") :])
        if not reply.get("success"):
            raise DeploymentError(f"flwr run failed: {out}")
        run_id = int(reply["run-id"])
        self._known.add(run_id)
        return run_id

    def run_info(self, run_id: int) -> dict[str, Any]:
        """The run's entry of ``flwr ls --format json`` (status, status-details, traffic, compute time)."""
        out = self.flwr(["ls", "loopback", "--run-id", str(run_id), "--format", "json"])
        reply = json.loads(out[out.index("{") :])
        runs = reply.get("runs", [])
        if not runs:
            raise DeploymentError(f"flwr ls knows no run {run_id}: {out}")
        return dict(runs[0])

    def status(self, run_id: int) -> str:
        """The run's status text as ``flwr ls`` gives it (e.g. ``running``, ``finished:completed``)."""
        return str(self.run_info(run_id).get("status", ""))

    def run_log(self, run_id: int) -> str:
        """The ServerApp's log of the run as the SuperLink keeps it (``flwr log --show``)."""
        return self.flwr(["log", str(run_id), "loopback", "--show"])

    def wait(self, run_id: int, timeout: float, poll: float = 15.0) -> str:
        """Wait until the run is finished; returns its final status (``finished:...``).

        Watches the SuperLink's log for the end of the run's ServerApp task (cheap) and asks
        ``flwr ls`` then, and every ``poll`` seconds in between (a ``flwr`` process costs
        about a second of CPU).

        Raises
        ------
        DeploymentError
            If it has not finished within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        marker = f"of run {run_id}"
        asked = time.monotonic()
        while True:
            ended = any("Finished task" in line and marker in line for line in self.log_text("superlink").splitlines())
            if ended or time.monotonic() - asked >= poll:
                status = self.status(run_id)
                asked = time.monotonic()
                if status.startswith("finished"):
                    return status
            if time.monotonic() > deadline:
                raise DeploymentError(f"run {run_id} not finished after {timeout:.0f} s; logs in {self.logs}")
            time.sleep(0.5)

    def log_text(self, name: str) -> str:
        """The log of process ``name`` (``superlink``, ``supernode-0``, ...) so far."""
        path = self.logs / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
