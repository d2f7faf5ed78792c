"""Checkpoints of the federated loop: everything a run needs to continue after a round.

A checkpoint lives in the run's partial folder, ``checkpoint/state.pt``, and is
replaced after every round (or every ``every`` rounds): written to a temporary
file, flushed to disk (``fsync``), then moved over the old one with
:func:`os.replace`, so a run killed at any moment leaves the previous complete
checkpoint. It holds

* the round to run next, and whether early stopping already ended the loop;
* the shared parameters and every client's private state (user embeddings, the
  sparse personal tables and the per-client head changes of oblivious grouping in
  their exact layout, heads, groups, loss ratios);
* the server's state: fusion-module parameters, teacher, server-side group
  assignment, oblivious-grouping centroids, the aggregation backend's round counter;
* the privacy ledger and adaptive clip (user-level DP) or each client's DP-SGD
  steps (record-level DP);
* model selection (best round, its validation metrics, patience count) and the
  selected model, which is stored once in ``best-round<r>.pt`` (or, when the best
  round is the round just finished, is the state itself);
* history and per-round timings;
* the process-wide random generators (torch default, numpy legacy, ``random``).
  The loop's own generators are derived afresh from ``(seed, purpose, round)``
  every round (:mod:`gfmfr_secure.rng`), so the round index is their whole state.

and a hash of the resolved config and one of the data, which :meth:`Checkpointer.load`
compares with the run being resumed. Secrets are not stored: in ``secrets: os`` mode
a resumed run draws fresh keys and DP noise from the OS, a valid continuation whose
metrics are not bit-for-bit those of an uninterrupted run (with ``reproducible``
secrets, or without DP, they are).

Tensors go through one ``torch.save`` and are read back with ``weights_only=True``;
everything else is JSON text inside the same file (floats round-trip exactly).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gfmfr_secure.client.state import ClientRows, ClientStateStore, RowStore
from gfmfr_secure.config import config_to_yaml
from gfmfr_secure.errors import ConfigError, DataError
from gfmfr_secure.models import SharedParams
from gfmfr_secure.privacy.accounting import PrivacyEvent, PrivacyLedger

__all__ = [
    "CHECKPOINT_DIR",
    "STATE_FILE",
    "Checkpointer",
    "LoopState",
    "config_hash",
    "data_fingerprint",
    "read_checkpoint_meta",
]

#: folder of the checkpoint inside a run folder
CHECKPOINT_DIR = "checkpoint"
#: the checkpoint file inside :data:`CHECKPOINT_DIR`
STATE_FILE = "state.pt"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- fingerprints


def config_hash(cfg: Any) -> str:
    """SHA-256 of the resolved config's YAML text (as written to ``config.yaml``)."""
    return hashlib.sha256(config_to_yaml(cfg).encode("utf-8")).hexdigest()


def data_fingerprint(data: Any, split: Any) -> str:
    """BLAKE2b of what training reads: the split's arrays and the item features."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{split.n_users} {split.n_items}".encode())
    arrays = [split.train_indptr, split.train_items, split.val_items, split.test_items]
    arrays += [f for f in (data.text_features, data.image_features) if f is not None]
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the loop's state


@dataclass
class LoopState:
    """The federated loop between two rounds (what :func:`run_federated` continues from).

    Attributes
    ----------
    next_round : the round to run next.
    stopped : early stopping ended the loop (only the test evaluation is left).
    shared, store : the global model and every client's private state.
    fusion : the fusion module's ``state_dict`` (None without distillation).
    teacher, assignment, centroids : server state (see :class:`ServerState`).
    aggregator_rounds : the aggregation backend's ``rounds_done``.
    floor_stats : group-floor counters of oblivious grouping.
    dp : user-level DP: ``clip``, ``clip_history`` and the ledger ``events``.
    dpsgd_events : record-level DP: each client's ``(sigma, q, steps)`` per round.
    selector : ``best_score``, ``best_round``, ``best_val``, ``stale``.
    snapshot : the selected model so far (None before the first validation).
    history, timing : per-round records and wall-clock lists.
    rng : process-wide generator states (see :func:`global_rng_state`).
    """

    next_round: int
    stopped: bool
    shared: SharedParams
    store: ClientStateStore
    fusion: dict[str, torch.Tensor] | None
    teacher: torch.Tensor | None
    assignment: np.ndarray
    centroids: np.ndarray | None
    aggregator_rounds: int
    floor_stats: dict[str, Any]
    dp: dict[str, Any] | None
    dpsgd_events: dict[int, list[tuple[float, float, int]]] | None
    selector: dict[str, Any]
    snapshot: tuple[SharedParams, ClientStateStore] | None
    history: list[dict[str, Any]]
    timing: dict[str, list[float]]
    rng: dict[str, Any]


def dp_state(dp: Any) -> dict[str, Any] | None:
    """What changes in a :class:`~gfmfr_secure.privacy.plan.UserLevelDP` while it runs."""
    if dp is None:
        return None
    return {"clip": dp.clip, "clip_history": list(dp.clip_history), "events": [dataclasses.asdict(e) for e in dp.ledger.events]}


def restore_dp(dp: Any, state: dict[str, Any] | None) -> None:
    """Put :func:`dp_state` back into ``dp`` (in place; nothing to do without user-level DP)."""
    if dp is None or state is None:
        return
    dp.clip = float(state["clip"])
    dp.clip_history = [float(c) for c in state["clip_history"]]
    dp.ledger = PrivacyLedger(PrivacyEvent(**e) for e in state["events"])


def selector_state(selector: Any) -> dict[str, Any]:
    """The model-selection counters of a :class:`ValidationSelector` (its snapshot aside)."""
    return {"best_score": selector.best_score, "best_round": selector.best_round, "best_val": selector.best_val, "stale": selector._stale}


def restore_selector(selector: Any, state: dict[str, Any], snapshot: Any) -> None:
    """Put :func:`selector_state` and the selected model back into ``selector`` (in place)."""
    selector.best_score = float(state["best_score"])
    selector.best_round = int(state["best_round"])
    selector.best_val = state["best_val"]
    selector._stale = int(state["stale"])
    selector.snapshot = snapshot


def global_rng_state() -> dict[str, Any]:
    """States of the process-wide generators: torch's default, numpy's legacy, Python's ``random``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "random": {"version": version, "words": list(words), "gauss_next": gauss_next},
    }


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`global_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    r = state["random"]
    random.setstate((r["version"], tuple(r["words"]), r["gauss_next"]))


# --------------------------------------------------------------------------- model tensors


def _model_tensors(shared: SharedParams, store: ClientStateStore) -> dict[str, torch.Tensor | None]:
    out: dict[str, torch.Tensor | None] = {f"shared.{f.name}": getattr(shared, f.name) for f in dataclasses.fields(shared)}
    out.update({
        "store.user_embedding": store.user_embedding,
        "store.ema_ratio": store.ema_ratio,
        "store.heads": store.heads,
        "store.group": torch.from_numpy(store.group),
    })
    if store.head_offset is not None:
        out.update({f"store.head_offset.{k}": v for k, v in store.head_offset.state_tensors().items()})
    if store.personal is not None:
        out.update({f"store.personal.{k}": v for k, v in store.personal.state_tensors().items()})
    return out


def _model_from_tensors(t: dict[str, Any]) -> tuple[SharedParams, ClientStateStore]:
    shared = SharedParams(**{f.name: t[f"shared.{f.name}"] for f in dataclasses.fields(SharedParams)})
    n_users, n_items = t["store.user_embedding"].shape[0], shared.item_table.shape[0]
    personal = None
    if "store.personal.keys" in t:
        personal = RowStore.from_state_tensors(n_users, n_items, {k: t[f"store.personal.{k}"] for k in ("keys", "slot", "rows")})
    head_offset = None
    if "store.head_offset.slot" in t:
        head_offset = ClientRows.from_state_tensors({k: t[f"store.head_offset.{k}"] for k in ("slot", "rows", "default")})
    elif t.get("store.head_offset") is not None:  # written before the rows were stored per client: a dense [U, H] table
        dense = t["store.head_offset"]
        head_offset = ClientRows.from_dense(dense, torch.full((dense.shape[1],), float("nan"), dtype=dense.dtype))
    store = ClientStateStore(
        user_embedding=t["store.user_embedding"],
        personal=personal,
        ema_ratio=t["store.ema_ratio"],
        heads=t["store.heads"],
        group=t["store.group"].numpy(),
        head_offset=head_offset,
    )
    return shared, store


# --------------------------------------------------------------------------- files


def _json_value(obj: Any) -> Any:
    """numpy scalars and arrays (as history records may hold them) as JSON values."""
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"value of type {type(obj).__name__} cannot go into a checkpoint: {obj!r}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_save(obj: Any, path: Path) -> int:
    """``torch.save`` to a temporary file, ``fsync``, then :func:`os.replace` onto ``path``; returns its size."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
        size = fh.tell()
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return size


def read_checkpoint_meta(folder: str | Path) -> dict[str, Any] | None:
    """The JSON part of ``folder/state.pt`` (round, hashes), without reading the tensors; None when absent."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    meta: dict[str, Any] = json.loads(blob["meta"])
    return meta


@dataclass
class Checkpointer:
    """Saves the loop's state into ``folder`` and loads it back for a resumed run.

    Attributes
    ----------
    folder : ``<run folder>/checkpoint``.
    every : save after every this many rounds (and after the last round and an early stop).
    config_hash, data_hash : fingerprints of the run (:func:`config_hash`, :func:`data_fingerprint`).
    """

    folder: Path
    every: int
    config_hash: str
    data_hash: str

    def due(self, round_idx: int, rounds: int, stopped: bool) -> bool:
        """Whether a checkpoint is written after round ``round_idx``."""
        return self.every > 0 and (stopped or round_idx == rounds - 1 or (round_idx + 1) % self.every == 0)

    def save(self, state: LoopState) -> tuple[float, int]:
        """Write ``state`` (atomically); returns the seconds it took and the bytes written."""
        t0 = time.perf_counter()
        written = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        best_round = int(state.selector["best_round"])
        snapshot_ref: str | None = None
        if state.snapshot is not None:
            # validation is the last step of a round: a snapshot of the round just run is the state itself
            snapshot_ref = "current" if best_round == state.next_round - 1 else f"best-round{best_round}.pt"
            if snapshot_ref != "current" and not (self.folder / snapshot_ref).is_file():
                written += _atomic_save(_model_tensors(*state.snapshot), self.folder / snapshot_ref)
        meta = {
            "format": FORMAT_VERSION,
            "config_hash": self.config_hash,
            "data_hash": self.data_hash,
            "next_round": state.next_round,
            "stopped": state.stopped,
            "snapshot": snapshot_ref,
            "aggregator_rounds": state.aggregator_rounds,
            "floor_stats": state.floor_stats,
            "dp": state.dp,
            "dpsgd_events": None if state.dpsgd_events is None else {str(c): [list(e) for e in ev] for c, ev in state.dpsgd_events.items()},
            "selector": state.selector,
            "history": state.history,
            "timing": state.timing,
            "rng_numpy": {k: v for k, v in state.rng["numpy"].items() if k != "key"},
            "rng_random": state.rng["random"],
        }
        tensors = _model_tensors(state.shared, state.store)
        tensors.update({f"fusion.{k}": v for k, v in (state.fusion or {}).items()})
        tensors.update({
            "server.teacher": state.teacher,
            "server.assignment": torch.from_numpy(state.assignment),
            "server.centroids": None if state.centroids is None else torch.from_numpy(state.centroids),
            "rng.torch": state.rng["torch"],
            "rng.numpy_key": state.rng["numpy"]["key"],
        })
        blob = {"meta": json.dumps(meta, default=_json_value), "tensors": tensors}
        written += _atomic_save(blob, self.folder / STATE_FILE)
        for stale in self.folder.glob("best-round*.pt"):
            if stale.name != snapshot_ref:
                stale.unlink()
        return time.perf_counter() - t0, written

    def load(self) -> LoopState:
        """The saved state, after checking it belongs to this config and data.

        Raises
        ------
        ConfigError
            If there is no checkpoint, it has another format, or it was made with another config.
        DataError
            If it was made with other data.
        """
        path = self.folder / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"no checkpoint at {str(path)!r}: the run cannot be resumed; start it again")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
        if meta.get("format") != FORMAT_VERSION:
            raise ConfigError(f"checkpoint {str(path)!r} has format {meta.get('format')!r}, this version reads {FORMAT_VERSION}; start the run again")
        if meta["config_hash"] != self.config_hash:
            raise ConfigError(
                f"checkpoint {str(path)!r} was made with another config than the run folder's config.yaml "
                "(edited, or defaults changed since); restore that config or start a new run"
            )
        if meta["data_hash"] != self.data_hash:
            raise DataError(
                f"checkpoint {str(path)!r} was made with other data than {self.folder.parent / 'config.yaml'} names "
                "(data.path): the split or the item features differ; restore that data or start a new run"
            )
        t = blob["tensors"]
        shared, store = _model_from_tensors(t)
        snapshot: tuple[SharedParams, ClientStateStore] | None = None
        if meta["snapshot"] == "current":
            snapshot = (shared.clone(), store.snapshot())
        elif meta["snapshot"] is not None:
            snapshot = _model_from_tensors(torch.load(self.folder / meta["snapshot"], map_location="cpu", weights_only=True))
        events = meta["dpsgd_events"]
        centroids = t["server.centroids"]
        return LoopState(
            next_round=int(meta["next_round"]),
            stopped=bool(meta["stopped"]),
            shared=shared,
            store=store,
            fusion={k.removeprefix("fusion."): v for k, v in t.items() if k.startswith("fusion.")} or None,
            teacher=t["server.teacher"],
            assignment=t["server.assignment"].numpy(),
            centroids=None if centroids is None else centroids.numpy(),
            aggregator_rounds=int(meta["aggregator_rounds"]),
            floor_stats=meta["floor_stats"],
            dp=meta["dp"],
            dpsgd_events=None if events is None else {int(c): [(float(s), float(q), int(n)) for s, q, n in ev] for c, ev in events.items()},
            selector=meta["selector"],
            snapshot=snapshot,
            history=meta["history"],
            timing=meta["timing"],
            rng={"torch": t["rng.torch"], "numpy": {**meta["rng_numpy"], "key": t["rng.numpy_key"]}, "random": meta["rng_random"]},
        )
