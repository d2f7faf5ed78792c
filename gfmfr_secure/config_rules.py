"""Rules that span config sections, checked once, before any data loads.

Each section of :class:`~gfmfr_secure.config.ExperimentConfig` checks its own ranges in
its ``__post_init__``. The rules here relate settings of different sections (or a setting
and a registry: methods, backbones, aggregation backends); :func:`validate` applies all
of them. :func:`~gfmfr_secure.config.load_config` and
:func:`~gfmfr_secure.config.with_overrides` call it on every config they return, so every
command (and the Flower apps, which load their config the same way) rejects an invalid
combination before reading any data.

The method registry (:data:`METHODS`) lives here because a method's name implies
settings of other sections; :mod:`gfmfr_secure.simulation.runner` re-exports it.

This module imports nothing heavy at import time: the backbone and aggregation-backend
registries are looked up when :func:`validate` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gfmfr_secure.errors import ConfigError

__all__ = ["METHODS", "MethodSpec", "method_spec", "register_method", "validate"]

@dataclass(frozen=True)
class MethodSpec:
    """A named method: how it trains and which settings its name implies (None = free)."""

    name: str
    trainer: str  # "federated" | "centralized"
    backbone: str | None = None
    distill: bool | None = None
    grouping: tuple[str, ...] | None = None
    description: str = ""


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS`; a name can be registered once."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


_GROUPED = ("spectral", "kmeans", "oblivious")
register_method(MethodSpec("gfmfr", "federated", "fedrap", True, _GROUPED, "GFMFR on the FedRAP backbone"))
register_method(MethodSpec("gfmfr-fedncf", "federated", "fedncf", True, _GROUPED, "GFMFR loss on the FedNCF backbone"))
register_method(MethodSpec("fedrap", "federated", "fedrap", False, None, "FedRAP"))
register_method(MethodSpec("fedncf", "federated", "fedncf", False, None, "FedAvg-NCF"))
register_method(MethodSpec("pfedrec", "federated", "pfedrec", False, None, "PFedRec (private score function)"))
register_method(MethodSpec("mm-fedrap", "federated", "fedrap", True, ("none",), "MM-FedRAP: server fusion, no groups"))
register_method(MethodSpec("mm-fedncf", "federated", "fedncf", True, ("none",), "MM-FedAvg (NCF): server fusion, no groups"))
register_method(MethodSpec("centralized", "centralized", "fedncf", False, None, "centralised NCF upper bound"))


def method_spec(cfg: Any) -> MethodSpec:
    """The registered spec of ``cfg.method``; ConfigError naming the known methods when there is none."""
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method]


def validate(cfg: Any) -> None:
    """Reject an :class:`~gfmfr_secure.config.ExperimentConfig` whose settings contradict each other.

    Pure: reads ``cfg`` and the registries, changes nothing, loads no data. The rules, in
    the order they are checked (the first broken one is reported):

    1. ``model.backbone`` is a registered backbone.
    2. ``distill.enabled`` needs a shared output layer (not a backbone that keeps its head
       private, ``pfedrec``).
    3. ``method`` is a registered method, and the backbone, ``distill.enabled`` and
       ``grouping.method`` its name implies are those of the config.
    4. ``aggregation.backend`` is a registered backend.
    5. Server-side grouping (``spectral``, ``kmeans``) under distillation clusters
       individual updates: only a backend that exposes them (``plain``) allows it.
    6. A secure backend sums uploads without weights: ``train.weighting=uniform``.
    7. ``aggregation.backend=masking`` with ``privacy.mechanism=central``: the server
       unmasks the sum, so central noise would come after it saw the noiseless sum.
    8. User-level DP (``central``, ``distributed``, ``local``) bounds each client's
       contribution: ``train.weighting=uniform``.
    9. ``privacy.mechanism=dpsgd``: clients do not upload their sample counts,
       ``train.weighting=uniform``.
    10. ``privacy.adaptive_clip`` needs a released count of unclipped clients: not under
        ``local`` DP.

    Rules that need the data, a round or a caller's argument are checked where those are:
    ``grouping.min_group_size`` against the clients that can take part and ``participants``
    (:class:`~gfmfr_secure.roles.server.FederatedServer`), ``fusion.modalities`` against the
    dataset's item features (:func:`~gfmfr_secure.roles.server.make_fusion`), ``data.path``
    (:func:`~gfmfr_secure.simulation.runner.prepare_data`), the reachability of
    ``privacy.epsilon`` (the noise calibration, when the DP plan is made), the honest
    noise shares against a round's survivors (:mod:`gfmfr_secure.privacy.plan`,
    :mod:`gfmfr_secure.aggregation.masking`), the synthetic clients of an ``upload_hook``
    (:class:`~gfmfr_secure.roles.inprocess.InProcessClients`), ``--resume`` of a
    centralised run (:func:`~gfmfr_secure.simulation.runner.run_training`), and the
    arguments of the library's functions (e.g. :mod:`gfmfr_secure.client.dpsgd`).

    Raises
    ------
    ConfigError
        Naming the settings that contradict each other.
    """
    from gfmfr_secure.aggregation import AGGREGATORS
    from gfmfr_secure.models.backbones import BACKBONES
    from gfmfr_secure.privacy.plan import USER_MECHANISMS
    from gfmfr_secure.server.grouping import SERVER_GROUPING
    from gfmfr_secure.types import Exposure

    model, tc, pc = cfg.model, cfg.train, cfg.privacy
    if model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone={model.backbone!r} is unknown; known: {', '.join(sorted(BACKBONES))}")
    if cfg.distill.enabled and BACKBONES[model.backbone].private_head:
        raise ConfigError(f"distill.enabled needs a shared output layer; backbone {model.backbone!r} keeps its head private")
    spec = method_spec(cfg)
    if spec.backbone is not None and model.backbone != spec.backbone:
        raise ConfigError(f"method {spec.name!r} uses model.backbone={spec.backbone!r}, config has {model.backbone!r}")
    if spec.distill is not None and cfg.distill.enabled != spec.distill:
        raise ConfigError(f"method {spec.name!r} needs distill.enabled={spec.distill}, config has {cfg.distill.enabled}")
    if spec.grouping is not None and cfg.grouping.method not in spec.grouping:
        raise ConfigError(f"method {spec.name!r} needs grouping.method in {list(spec.grouping)}, config has {cfg.grouping.method!r}")
    backend = cfg.aggregation.backend
    if backend not in AGGREGATORS:
        raise ConfigError(f"aggregation.backend={backend!r} is unknown; known: {', '.join(sorted(AGGREGATORS))}")
    secure = AGGREGATORS[backend].exposure != Exposure.PER_CLIENT
    if secure and cfg.distill.enabled and cfg.grouping.method in SERVER_GROUPING:
        raise ConfigError(
            f"grouping.method={cfg.grouping.method!r} clusters individual client updates, which backend "
            f"{backend!r} does not expose; use grouping.method=oblivious"
        )
    if secure and tc.weighting != "uniform":
        raise ConfigError(f"aggregation.backend={backend!r} sums uploads without weights: set train.weighting=uniform")
    if backend == "masking" and pc.mechanism == "central":
        raise ConfigError(
            "aggregation.backend=masking: the server unmasks the sum, so central DP noise would be added after it saw "
            "the noiseless sum; use privacy.mechanism=distributed (or local)"
        )
    if pc.mechanism in USER_MECHANISMS and tc.weighting != "uniform":
        raise ConfigError(
            f"privacy.mechanism={pc.mechanism}: user-level DP bounds each client's contribution: set train.weighting=uniform "
            "(sample weights change the sensitivity)"
        )
    if pc.mechanism == "dpsgd" and tc.weighting != "uniform":
        raise ConfigError("privacy.mechanism=dpsgd: clients do not upload their sample counts; set train.weighting=uniform")
    if pc.adaptive_clip and pc.mechanism == "local":
        raise ConfigError("privacy.adaptive_clip needs a released count of unclipped clients: use privacy.mechanism central or distributed")
