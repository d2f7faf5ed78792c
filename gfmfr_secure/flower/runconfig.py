"""The Flower run config (``[tool.flwr.app.config]`` plus ``flwr run --run-config``) as an experiment config.

Both apps read the same run config, so the ServerApp and every ClientApp build the same
:class:`~gfmfr_secure.config.ExperimentConfig`; only the data folder is each machine's own.

Keys (defaults in ``pyproject.toml``):

``config``
    YAML experiment config. A relative path is looked up beside the app first (the
    unpacked FAB, which carries ``configs/``), then in the working directory.
``overrides``
    ``KEY=VALUE`` settings as ``train --set`` takes them, separated by spaces (quote a
    value holding spaces, shell style), e.g. ``"train.rounds=2 seed=3"``.
``data``
    Data folder. The ServerApp reads it for the item features and sizes; a SuperNode's
    ``data`` node-config key, when given, overrides it for that node. Empty: ``$GFMFR_DATA``.
``out``, ``name``
    Parent folder and name of the run folder the ServerApp writes (name empty: the
    ``train`` default ``<method>-<UTC time>-seed<seed>``).
``round-timeout``
    Seconds the ServerApp waits for the SuperNodes' replies to one request; a node that
    has not answered by then is dropped for the rest of the run.
``min-nodes``, ``wait-nodes``
    The ServerApp waits up to ``wait-nodes`` seconds for ``min-nodes`` SuperNodes before
    the first message.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gfmfr_secure
from gfmfr_secure.config import load_config, resolve_data_path
from gfmfr_secure.errors import ConfigError

__all__ = ["RunSettings", "app_dir", "check_supported", "experiment_config"]


def app_dir() -> Path:
    """The folder holding the ``gfmfr_secure`` package in use (the unpacked FAB under Flower)."""
    return Path(gfmfr_secure.__file__).resolve().parent.parent


def _text(run_config: Mapping[str, Any], key: str, default: str = "") -> str:
    value = run_config.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"run config {key!r} must be a string, got {value!r}")
    return value


def _number(run_config: Mapping[str, Any], key: str, default: float) -> float:
    value = run_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"run config {key!r} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RunSettings:
    """The run config's keys (see the module docstring)."""

    config: str
    overrides: tuple[str, ...]
    data: str
    out: str
    name: str
    round_timeout: float
    min_nodes: int
    wait_nodes: float

    @classmethod
    def of(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Read and check the keys.

        Raises
        ------
        ConfigError
            On a missing ``config``, a value of the wrong type, unbalanced quotes in
            ``overrides``, or a non-positive timeout / node count.
        """
        config = _text(run_config, "config")
        if not config:
            raise ConfigError("run config 'config' is empty: name a YAML experiment config, e.g. configs/fedrap.yaml")
        try:
            overrides = tuple(shlex.split(_text(run_config, "overrides")))
        except ValueError as err:
            raise ConfigError(f"run config 'overrides' does not split into KEY=VALUE items: {err}") from None
        settings = cls(
            config=config,
            overrides=overrides,
            data=_text(run_config, "data"),
            out=_text(run_config, "out", "runs"),
            name=_text(run_config, "name"),
            round_timeout=_number(run_config, "round-timeout", 600.0),
            min_nodes=int(_number(run_config, "min-nodes", 1)),
            wait_nodes=_number(run_config, "wait-nodes", 120.0),
        )
        if settings.round_timeout <= 0 or settings.wait_nodes < 0:
            raise ConfigError(f"run config round-timeout must be > 0 and wait-nodes >= 0, got {settings.round_timeout} and {settings.wait_nodes}")
        if settings.min_nodes < 1:
            raise ConfigError(f"run config min-nodes must be >= 1, got {settings.min_nodes}")
        return settings

    def config_path(self) -> Path:
        """The YAML file: absolute as given, else beside the app, else relative to the working directory."""
        path = Path(self.config).expanduser()
        if path.is_absolute():
            return path
        beside = app_dir() / path
        return beside if beside.is_file() else path


def experiment_config(run_config: Mapping[str, Any], data: str | None = None) -> Any:
    """The experiment config the run config describes, its data folder resolved.

    Parameters
    ----------
    run_config : Flower's ``context.run_config``.
    data : this machine's data folder (a SuperNode's node config); None or empty: the run
        config's ``data``, else ``$GFMFR_DATA``, else the YAML's ``data.path``.

    Raises
    ------
    ConfigError
        As :meth:`RunSettings.of`, :func:`~gfmfr_secure.config.load_config` and
        :func:`~gfmfr_secure.config.resolve_data_path` do.
    """
    settings = RunSettings.of(run_config)
    cfg = load_config(settings.config_path(), settings.overrides)
    return resolve_data_path(cfg, data or settings.data or None)


def check_supported(cfg: Any) -> None:
    """Refuse settings this deployment does not carry.

    Carried: the ``plain`` backend; ``masking`` as one SecAgg+ round per sum among the
    cohort's parties on every node, relayed by the ServerApp (:mod:`gfmfr_secure.flower.relay`);
    central, distributed and local user-level DP, adaptive clipping included (under central DP
    with ``plain`` each node sends its clients' clipped-count query with its uploads, and the
    server adds its noise as in process); record-level DP-SGD (each node keeps its clients'
    accountant events in its state file). Under ``masking`` with oblivious grouping
    the count phase is a SecAgg round too, and the clients check the reported counts
    against its transcript, which the ServerApp sends them. Under ``masking`` the clients'
    broadcast attestation runs on each node among the cohort as that node received the
    broadcast (one message per node), so it does not compare what different nodes received.
    ``ckks`` with ``aggregation.custody=authority``: the clients encrypt on their nodes, the
    ServerApp adds ciphertexts, the SuperNode with partition-id 0 is the key holder
    (:mod:`gfmfr_secure.flower.ckks_relay`) and checks the reported counts against its release.

    Raises
    ------
    ConfigError
        For ``ckks`` with ``aggregation.custody=shared-clients`` (the shared secret key would
        reach the clients' nodes only through the ServerApp); for ``masking`` with ``aggregation.dropout`` (a
        simulated dropout; over Flower the dropouts are the nodes that stop answering).
    """
    backend = cfg.aggregation.backend
    if backend not in ("plain", "masking", "ckks"):
        raise ConfigError(f"aggregation.backend={backend!r} over Flower is not built; use aggregation.backend=masking, ckks or plain")
    if backend == "ckks" and cfg.aggregation.custody != "authority":
        raise ConfigError(
            f"aggregation.custody={cfg.aggregation.custody!r} over Flower is not built: the clients' shared secret key would reach "
            "the SuperNodes only through the ServerApp, which could then decrypt every upload; set aggregation.custody=authority "
            "(the SuperNode with partition-id 0 holds the key)"
        )
    if backend == "masking" and cfg.aggregation.dropout > 0:
        raise ConfigError(
            f"aggregation.dropout={cfg.aggregation.dropout} simulates dropouts in process; over Flower the dropouts are the "
            "SuperNodes that stop answering (round-timeout): set aggregation.dropout=0"
        )
