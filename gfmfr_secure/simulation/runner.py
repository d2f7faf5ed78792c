"""Entry points used by the command line: train a configured method, reload a run.

Methods are registered by name with the facts their name promises (backbone,
whether distillation is on, grouping; :mod:`gfmfr_secure.config_rules`, re-exported
here); a config whose settings contradict its method name is rejected, so a results
table can trust its labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gfmfr_secure.client.state import ClientStateStore, RowStore
from gfmfr_secure.config import load_config
from gfmfr_secure.config_rules import METHODS, MethodSpec, method_spec, register_method, validate
from gfmfr_secure.curves import plot_learning_curve
from gfmfr_secure.data import kcore, leave_one_out, load_dataset, to_implicit
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.models import SharedParams, get_backbone
from gfmfr_secure.simulation.scoring import score_users

__all__ = ["METHODS", "MethodSpec", "check_method", "load_scorer", "prepare_data", "register_method", "run_training"]


def check_method(cfg: Any) -> MethodSpec:
    """The method's spec, after :func:`~gfmfr_secure.config_rules.validate` (the config's rules, in one place)."""
    validate(cfg)
    return method_spec(cfg)


def prepare_data(cfg: Any) -> tuple[Any, Any]:
    """Load, convert to implicit feedback, optionally k-core filter, split (leave-one-out)."""
    dc = cfg.data
    if not dc.path:
        raise ConfigError("data.path is not set (use --data DIR or GFMFR_DATA)")
    data = load_dataset(dc.path, fmt=dc.format, text_features=dc.text_features, image_features=dc.image_features, duplicates=dc.duplicates)
    data = to_implicit(data, dc.implicit_threshold)
    if dc.kcore > 1:
        data = kcore(data, dc.kcore)
    return data, leave_one_out(data, dc.min_interactions)


def run_training(
    cfg: Any,
    run: Any,
    *,
    progress: bool = True,
    keep_model: bool = True,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data.path``; write history, learning curve and (``keep_model``) model into ``run``; return metrics.

    Parameters
    ----------
    keep_model : write ``model.pt`` (the selected model, for ``evaluate --run``).
    checkpoint_every : save the federated loop's state in ``run``'s ``checkpoint/`` folder
        after every this many rounds (0: never). The centralised trainer writes none.
    resume : continue from the checkpoint in ``run`` (made with this config and data).

    Raises
    ------
    ConfigError
        When resuming a centralised run, or a checkpoint that is missing or was made with
        another config; :class:`~gfmfr_secure.errors.DataError` when it was made with other data.
    """
    spec = check_method(cfg)
    log = getattr(run, "logger", logging.getLogger("gfmfr_secure"))
    if resume and spec.trainer == "centralized":
        raise ConfigError(f"method {cfg.method!r} cannot be resumed: its trainer writes no checkpoints; start the run again")
    data, split = prepare_data(cfg)
    log.info("data %s: %d users, %d items, %d interactions", data.name, data.n_users, data.n_items, data.users.size)
    if spec.trainer == "centralized":
        from gfmfr_secure.simulation.centralized import run_centralized

        if checkpoint_every:
            log.info("method %s writes no checkpoints: an interrupted run cannot be resumed", cfg.method)
        result = run_centralized(cfg, split, logger=log, progress=progress, label=getattr(run, "name", None))
    else:
        from gfmfr_secure.simulation.checkpoint import CHECKPOINT_DIR, Checkpointer, config_hash, data_fingerprint
        from gfmfr_secure.simulation.loop import run_federated
        from gfmfr_secure.simulation.views import ViewRecorder

        checkpoint = Checkpointer(run.path(CHECKPOINT_DIR), checkpoint_every, config_hash(cfg), data_fingerprint(data, split))
        state = checkpoint.load() if resume else None
        callbacks = [ViewRecorder(run.path("views"), cfg.record.views_rounds)] if cfg.record.views_rounds else []
        result = run_federated(
            cfg, data, split, logger=log, progress=progress, callbacks=callbacks,
            checkpoint=checkpoint if checkpoint_every > 0 else None, resume=state, label=getattr(run, "name", None),
        )
    if keep_model:
        save_model(run.path("model.pt"), result.shared, result.store)
    run.write_json("history.json", result.history)
    plot_learning_curve(result.history, run.path("curve.png"), best_round=result.metrics.get("best_round"), title=f"{cfg.method}, seed {cfg.seed}")
    return result.metrics


def save_model(path: Path, shared: SharedParams, store: ClientStateStore) -> None:
    """Save the selected model (shared parameters and client state) for ``evaluate --run``."""
    state = {
        "shared": {k: v for k, v in vars(shared).items()},
        "user_embedding": store.user_embedding,
        "heads": store.heads,
        "personal_keys": None if store.personal is None else torch.from_numpy(store.personal.keys),
        "personal_values": None if store.personal is None else store.personal.values,
    }
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_scorer(run_dir: str | Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], Any]:
    """Reload a finished run: (score_fn for users -> [B, I] scores, its split)."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.pt"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir} is not a finished run folder: {name} is missing")
    cfg = load_config(run_dir / "config.yaml")
    _, split = prepare_data(cfg)
    state = torch.load(run_dir / "model.pt", weights_only=True)
    shared = SharedParams(**state["shared"])
    backbone = get_backbone(cfg.model.backbone)
    personal = None
    if state["personal_keys"] is not None:
        personal = RowStore.from_rows(split.n_users, split.n_items, state["personal_keys"].numpy(), state["personal_values"])
    store = ClientStateStore(
        user_embedding=state["user_embedding"],
        personal=personal,
        ema_ratio=torch.zeros(split.n_users, dtype=torch.float64),
        heads=state["heads"],
        group=np.full(split.n_users, -1, dtype=np.int64),
    )
    return (lambda users: score_users(shared, store, backbone, users, scorer=cfg.model.scorer)), split
