"""Scale benchmark: synthetic populations from 10k x 5k to 100k x 50k, a 1% cohort.

For each size a synthetic implicit dataset is generated (seeded; Zipf item popularity;
about 24 interactions per user; item features of the ML-100K widths for GFMFR) and written
as an interactions CSV with ``items.csv`` and feature ``.npy`` files beside it (cached
under ``--cache``), so the run reads it through the library's own CSV loader. Each size
then runs in a subprocess of its own, so that peak memory is per size, and prints per
phase (load, split, negatives, client state, client training, aggregation, server,
evaluation) the wall time and the peak resident memory reached during the phase (the
kernel's high-water mark, reset before each phase through ``/proc/self/clear_refs``;
on systems without it, the process peak so far). At the end a table, a JSON file and a
log-log plot of time per round and peak memory against users x items and against
interactions.

    python benchmarks/bench_scale.py                               # default grid, FedRAP
    python benchmarks/bench_scale.py --sizes 100000x50000 --method gfmfr --rounds 10
    python benchmarks/bench_scale.py --cohort 1000 --method fedrap,gfmfr   # a fixed cohort at every size
    python benchmarks/bench_scale.py --sizes 20000x10000 --set eval.max_users=0

``--secure masking,ckks`` adds, per method and size, the cost of secure aggregation for a
cohort of ``--secure-cohort`` clients (default 1000): bytes uploaded and downloaded per
client, client seconds and server seconds per client, measured with the library's
protocol code over the dense group-indexed layout of ``D = G * (I*d + H + 1)`` values
that the ``masking`` and ``ckks`` backends sum (G groups for GFMFR, 1 for FedRAP), beside
a plain item-sparse upload (touched rows only) and a plain dense float32 one. Masking plays
one SecAgg+ closed neighbourhood (k + 1 clients, a full round of ``secure_sum``: each
client does what a client of an n-client SecAgg+ round does); CKKS encrypts
``--secure-clients`` uploads (default 4) and adds them one at a time. Nobody builds an
n x D matrix: per-client server time is multiplied by n (a linear extrapolation, printed
as such). ``--secure-only`` skips the training runs::

    python benchmarks/bench_scale.py --sizes 100000x50000 --method fedrap,gfmfr --secure masking,ckks --secure-only

``--max-rss-gib`` (default 10) kills a size's process when its resident memory exceeds it
(the row then says so); run large sizes under ``prlimit --as=...`` as well on a shared
machine. Phase times are summed over the calls of a run (negatives, client training,
aggregation and server once per round; evaluation once per validation and once for the
test). "per round" is the mean over rounds of client plus server time (negatives
included, validation excluded).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
_DEFAULT_SIZES = "10000x5000,20000x10000,50000x25000,100000x50000"
_PHASES = ("load", "split", "client state", "negatives", "client training", "aggregation", "server", "evaluation")
_CONFIGS = {"fedrap": "configs/fedrap.yaml", "gfmfr": "configs/gfmfr.yaml", "pfedrec": "configs/pfedrec.yaml"}
_TEXT_DIM, _IMAGE_DIM = 384, 1280  # the widths of the ML-100K reference features


# --------------------------------------------------------------------------- synthetic data


def zipf_interactions(n_users: int, n_items: int, *, mean: float = 24.0, exponent: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Implicit interactions with Zipf item popularity: (users, items, timestamps), int64 [N] each.

    Item ``i`` has popularity rank ``r_i`` (a random permutation) and probability
    ``r_i^-exponent / H``; user ``u`` draws ``3 + Geometric`` items (mean ``mean``), distinct
    within the user (repeats are redrawn; the few left after 30 redraws are dropped).
    Timestamps are random, so the leave-one-out split holds out two random items per user.
    """
    rng = np.random.default_rng([seed, n_users, n_items])
    p = np.arange(1, n_items + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(p[rng.permutation(n_items)])
    cdf /= cdf[-1]
    counts = 3 + rng.geometric(1.0 / (mean - 2.0), size=n_users) - 1
    counts = np.minimum(counts, n_items // 2)
    users = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    items = np.minimum(np.searchsorted(cdf, rng.random(users.size)), n_items - 1).astype(np.int64)
    for _ in range(30):
        keys = users * n_items + items
        order = np.argsort(keys, kind="stable")
        repeat = np.zeros(keys.size, dtype=bool)
        repeat[order[1:]] = keys[order[1:]] == keys[order[:-1]]
        if not repeat.any():
            break
        items[repeat] = np.minimum(np.searchsorted(cdf, rng.random(int(repeat.sum()))), n_items - 1)
    keys = np.unique(users * n_items + items)
    users, items = keys // n_items, keys % n_items
    timestamps = rng.integers(0, 10**9, size=users.size, dtype=np.int64)
    return users, items, timestamps


def write_dataset(folder: Path, n_users: int, n_items: int, seed: int) -> Path:
    """Write the synthetic set as ``folder/interactions.csv`` plus ``items.csv`` and features; returns the CSV."""
    import pandas as pd

    csv = folder / "interactions.csv"
    if csv.is_file():
        return csv
    folder.mkdir(parents=True, exist_ok=True)
    users, items, timestamps = zipf_interactions(n_users, n_items, seed=seed)
    rng = np.random.default_rng([seed, n_users, n_items, 1])
    clusters = rng.normal(size=(32, 16))
    latent = clusters[rng.integers(0, 32, size=n_items)] + 0.5 * rng.normal(size=(n_items, 16))
    (folder / "features").mkdir(exist_ok=True)  # not beside the CSV: FedRAP runs do not load them
    for name, width in (("text_feat.npy", _TEXT_DIM), ("image_feat.npy", _IMAGE_DIM)):
        feats = latent @ rng.normal(size=(16, width)) / 4.0 + 0.3 * rng.normal(size=(n_items, width))
        np.save(folder / "features" / name, feats.astype(np.float32))
    pd.DataFrame({"itemId": np.arange(n_items), "popularity_rank": np.argsort(np.argsort(-np.bincount(items, minlength=n_items)))}).to_csv(folder / "items.csv", index=False)
    tmp = folder / ".interactions.csv.tmp"
    pd.DataFrame({"userId": users, "itemId": items, "rating": 1, "timestamp": timestamps}).to_csv(tmp, index=False)
    tmp.replace(csv)
    return csv


# --------------------------------------------------------------------------- one size (child process)


def _peak_reset() -> bool:
    """Reset this process's resident high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    """Resident high-water mark since the last reset (or the process peak), MiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Phases:
    """Wall time and peak resident memory per phase, summed (time) or maximised (memory) over calls."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(_PHASES, 0.0)
        self.peak = dict.fromkeys(_PHASES, 0.0)
        self.calls = dict.fromkeys(_PHASES, 0)
        self._depth = 0

    def run(self, phase: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        outer = self._depth == 0  # a phase inside another is counted in the outer one only
        if outer:
            _peak_reset()
            t0 = time.perf_counter()
        self._depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            self._depth -= 1
            if outer:
                self.seconds[phase] += time.perf_counter() - t0
                self.peak[phase] = max(self.peak[phase], _peak_mib())
                self.calls[phase] += 1

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            return self.run(phase, fn, *args, **kwargs)

        return timed


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.method`` on one synthetic size; returns the figures (the child's JSON line)."""
    import gfmfr_secure  # noqa: F401  (first: sets the OpenMP wait policy before torch loads OpenMP)

    # isort: split
    import torch

    from gfmfr_secure.client import state as state_mod
    from gfmfr_secure.config import load_config
    from gfmfr_secure.data import leave_one_out, load_dataset, to_implicit
    from gfmfr_secure.roles import client, inprocess, server
    from gfmfr_secure.simulation import loop

    torch.set_num_threads(args.threads)
    n_users, n_items = _parse_size(args.one)
    t = time.perf_counter()
    csv = write_dataset(Path(args.cache) / f"zipf-{n_users}x{n_items}-seed{args.seed}", n_users, n_items, args.seed)
    generate_s = time.perf_counter() - t
    fraction = min(1.0, args.cohort / n_users) if args.cohort else args.fraction
    overrides = [f"data.path={csv}", f"train.rounds={args.rounds}", f"train.client_fraction={fraction!r}", "train.patience=0"]
    if args.method == "gfmfr":
        overrides += [f"data.{m}_features={csv.parent / 'features' / f'{m}_feat.npy'}" for m in ("text", "image")]
    cfg = load_config(_ROOT / _CONFIGS[args.method], overrides + args.overrides)
    ph = Phases()
    start_faults = resource.getrusage(resource.RUSAGE_SELF)
    t_all = time.perf_counter()
    data = ph.run("load", lambda: to_implicit(load_dataset(cfg.data.path, fmt=cfg.data.format, text_features=cfg.data.text_features, image_features=cfg.data.image_features, duplicates=cfg.data.duplicates), cfg.data.implicit_threshold))
    split = ph.run("split", leave_one_out, data, cfg.data.min_interactions)

    # the roles' collaborators, wrapped where the roles look them up (module globals of
    # roles.client, roles.server and roles.inprocess; the engine in loop calls the roles)
    store_cls = state_mod.ClientStateStore
    create, snapshot = store_cls.create.__func__, store_cls.snapshot  # type: ignore[attr-defined]
    patches: dict[tuple[Any, str], Any] = {
        (store_cls, "create"): classmethod(ph.wrap("client state", create)),
        (store_cls, "snapshot"): ph.wrap("client state", snapshot),
        (client, "sample_training"): ph.wrap("negatives", client.sample_training),
        (client, "train_cohort"): ph.wrap("client training", client.train_cohort),
        (client, "clip_upload"): ph.wrap("aggregation", client.clip_upload),
        (client, "oblivious_groups"): ph.wrap("client state", client.oblivious_groups),
        (client, "user_ranks"): ph.wrap("evaluation", client.user_ranks),
        (inprocess, "count_phase"): ph.wrap("aggregation", inprocess.count_phase),
        (server, "group_clients"): ph.wrap("server", server.group_clients),
        (server, "apply_fedavg_"): ph.wrap("server", server.apply_fedavg_),
        (server, "update_teacher_"): ph.wrap("server", server.update_teacher_),
    }
    make_aggregator = inprocess.get_aggregator

    def get_aggregator(*a: Any, **k: Any) -> Any:
        agg = make_aggregator(*a, **k)
        agg.aggregate = ph.wrap("aggregation", agg.aggregate)
        return agg

    patches[(inprocess, "get_aggregator")] = get_aggregator
    saved = {key: key[0].__dict__[key[1]] for key in patches}
    for (owner, name), value in patches.items():
        setattr(owner, name, value)
    try:
        run = loop.run_federated(cfg, data, split, progress=False)
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
    total_s = time.perf_counter() - t_all
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rounds = run.history
    per_round = [r.get("client_s", 0.0) + r.get("server_s", 0.0) for r in rounds]
    return {
        "method": args.method,
        "users": int(split.n_users),
        "items": int(split.n_items),
        "interactions": int(data.users.size),
        "rounds": len(rounds),
        "cohort_mean": float(np.mean([r.get("cohort", 0) for r in rounds])) if rounds else 0.0,
        "round_s": float(np.mean(per_round)) if per_round else 0.0,
        "round_s_after_first": float(np.mean(per_round[1:])) if len(per_round) > 1 else None,
        "client_s": float(np.mean([r.get("client_s", 0.0) for r in rounds])) if rounds else 0.0,
        "grouping_s": float(np.mean([r.get("grouping_s", 0.0) for r in rounds])) if rounds else 0.0,
        "fusion_s": float(np.mean([r.get("fusion_s", 0.0) for r in rounds])) if rounds else 0.0,
        "total_s": total_s,
        "generate_s": generate_s,
        "phases": {p: {"s": ph.seconds[p], "peak_mib": ph.peak[p], "calls": ph.calls[p]} for p in _PHASES},
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "minor_faults": usage.ru_minflt - start_faults.ru_minflt,
        "cpu_user_s": usage.ru_utime - start_faults.ru_utime,
        "cpu_system_s": usage.ru_stime - start_faults.ru_stime,
        "client_state_mib": run.store.nbytes / 2**20,
        "eval_users": run.metrics["test"]["users"],
        "val_ndcg10": (run.metrics.get("val") or {}).get("NDCG@10"),
        "test_hr10": run.metrics["test"]["HR@10"],
        "test_ndcg10": run.metrics["test"]["NDCG@10"],
    }


# --------------------------------------------------------------------------- secure aggregation at scale (child process)

_SCHEMES = ("masking", "ckks")
_MEAN_INTERACTIONS = 24.0  # zipf_interactions' default: about 24 interactions per user
_HELD_OUT = 2  # leave-one-out holds out a validation and a test item per user


def secure_layout_for(method: str, n_items: int, overrides: list[str]) -> tuple[Any, Any, int]:
    """The dense group-indexed layout a secure backend sums for ``method`` on ``n_items`` items.

    Returns (the :class:`~gfmfr_secure.privacy.release.ReleaseLayout` of G blocks of
    ``I * d + H + 1`` values, the config, the item rows a client touches in a round:
    ``(mean interactions - held-out) * (1 + train.num_negatives)``).
    """
    from gfmfr_secure.config import load_config
    from gfmfr_secure.models.backbones import get_backbone
    from gfmfr_secure.models.params import head_size
    from gfmfr_secure.privacy.release import ReleaseLayout

    cfg = load_config(_ROOT / _CONFIGS[method], overrides)
    d = cfg.model.latent_dim
    groups = cfg.grouping.num_groups if method == "gfmfr" and cfg.grouping.method != "none" else 1
    head = 0 if get_backbone(cfg.model.backbone).private_head else head_size(d)
    positives = round(_MEAN_INTERACTIONS) - _HELD_OUT
    rows = min(n_items, positives * (1 + cfg.train.num_negatives))
    return ReleaseLayout(groups, n_items, d, head, 1.0), cfg, rows


def synthetic_uploads(layout: Any, n_clients: int, rows: int, seed: int) -> np.ndarray:
    """float32 [n_clients, G * block]: dense uploads made by the library's layout code.

    Client ``u`` touches ``rows`` random item rows (item deltas N(0, 0.01^2)), has a head
    delta of the same scale and sits in group ``u mod G``; the values do not change the
    cost of masking or encryption, only D does.
    """
    import torch

    from gfmfr_secure.aggregation.layout import dense_uploads
    from gfmfr_secure.types import CohortUpdate

    rng = np.random.default_rng([seed, n_clients, layout.n_items])
    items = np.sort(np.argsort(rng.random((n_clients, layout.n_items)), axis=1)[:, :rows], axis=1)
    head = layout.head_size
    update = CohortUpdate(
        clients=np.arange(n_clients, dtype=np.int64),
        n_samples=np.full(n_clients, rows, dtype=np.int64),
        row_ptr=np.arange(n_clients + 1, dtype=np.int64) * rows,
        row_items=items.reshape(-1).astype(np.int64),
        item_delta=torch.from_numpy(0.01 * rng.standard_normal((n_clients * rows, layout.latent_dim), dtype=np.float32)),
        head_delta=torch.from_numpy(0.01 * rng.standard_normal((n_clients, head), dtype=np.float32)) if head else None,
        head_after=None,
        group=np.arange(n_clients, dtype=np.int64) % layout.n_groups,
        loss=np.zeros(n_clients),
    )
    return dense_uploads(update, layout, update.group if layout.n_groups > 1 else None)


def measure_masking(layout: Any, cfg: Any, rows: int, neighbours: int, seed: int) -> dict[str, Any]:
    """Per-client cost of pairwise masking with SecAgg+ degree ``neighbours`` (k), measured on k + 1 clients.

    One closed neighbourhood, k + 1 clients on the complete graph, runs a full round of
    :func:`gfmfr_secure.secagg.masking.secure_sum` over the dense layout: each client then
    does exactly what a client of a SecAgg+ round of any n does (k key agreements, k share
    ciphertexts, k pair masks and one self mask of D words, threshold
    ``ceil(threshold_fraction * (k + 1))``), and the server's work per survivor (check,
    add, rebuild and remove its self mask) is the same; with no dropouts it is linear in n.
    """
    from gfmfr_secure.secagg.masking import secure_sum

    n = neighbours + 1
    threshold = max(2, math.ceil(cfg.aggregation.threshold_fraction * n))
    t0 = time.perf_counter()
    vectors = synthetic_uploads(layout, n, rows, seed)
    layout_s = (time.perf_counter() - t0) / n
    result = secure_sum(vectors, value_bound=cfg.aggregation.value_bound, threshold=threshold, neighbours=None, seed=seed, workers=1)
    err = float(np.max(np.abs(result.total - vectors.sum(axis=0, dtype=np.float64))))
    del vectors
    c = result.costs
    key_s = c.client_keygen_s + c.client_share_s + c.client_unmask_s
    return {
        "scheme": "masking",
        "label": f"masking (SecAgg+ k={neighbours}, t={threshold})",
        "clients_played": n,
        "bytes_up": float(np.mean(c.bytes_up)),
        "bytes_down": float(np.mean(c.bytes_down)),
        "client_s": float(np.mean(key_s + c.client_mask_s)) + layout_s,
        "client_key_s": float(np.mean(key_s)),
        "client_mask_s": float(np.mean(c.client_mask_s)),
        "layout_s": layout_s,
        "server_s_per_client": (c.server_setup_s + c.server_aggregate_s + c.server_unmask_s) / n,
        "max_abs_error": err,
    }


def measure_ckks(layout: Any, cfg: Any, rows: int, n_clients: int, cohort: int, seed: int) -> dict[str, Any]:
    """Per-client cost of CKKS aggregation (the ``ckks`` backend's packed wire format), measured on ``n_clients``.

    The key holder makes the keys of a ``cohort``-client sum (:func:`ckks_params_for`);
    each client encrypts its dense layout (:class:`Encryptor`) and the aggregator validates
    and adds it (:meth:`CKKSAggregator.add`), one upload at a time, timed apart; the key
    holder then decrypts the sum once (its time is per round, not per client).
    """
    from gfmfr_secure.aggregation.ckks import ckks_params_for
    from gfmfr_secure.secagg.ckks import KeyHolder

    params = ckks_params_for(cfg.aggregation.value_bound, cohort, packing="coefficients")
    t0 = time.perf_counter()
    vectors = synthetic_uploads(layout, n_clients, rows, seed)
    layout_s = (time.perf_counter() - t0) / n_clients
    dim = vectors.shape[1]
    t0 = time.perf_counter()
    holder = KeyHolder(params, custody=cfg.aggregation.custody)
    keygen_s = time.perf_counter() - t0
    encryptor = holder.encryptor(dim, wire="packed")
    aggregator = holder.aggregator(dim, wire="packed")
    encrypt_s, add_s, sent = np.zeros(n_clients), np.zeros(n_clients), np.zeros(n_clients)
    try:
        for u in range(n_clients):  # K clients, each a whole D-vector: the loop is over a handful
            t0 = time.perf_counter()
            upload = encryptor.encrypt(vectors[u])
            encrypt_s[u] = time.perf_counter() - t0
            sent[u] = sum(len(blob) for blob in upload)
            t0 = time.perf_counter()
            aggregator.add(upload)
            add_s[u] = time.perf_counter() - t0
            del upload
        encrypted = aggregator.result()
    finally:
        encryptor.close()
        aggregator.close()
    t0 = time.perf_counter()
    total = holder.decryptor(dim, wire="packed").decrypt(encrypted)
    decrypt_s = time.perf_counter() - t0
    err = float(np.max(np.abs(total - vectors.sum(axis=0, dtype=np.float64))))
    tolerance = params.release_tolerance(n_clients, dim, symmetric=holder.symmetric, packing="coefficients")
    return {
        "scheme": "ckks",
        "label": f"ckks (packed, N={params.poly_modulus_degree}, {holder.custody})",
        "clients_played": n_clients,
        "bytes_up": float(np.mean(sent)),
        "bytes_down": float(len(holder.client_context_bytes())),
        "client_s": float(np.mean(encrypt_s)) + layout_s,
        "layout_s": layout_s,
        "server_s_per_client": float(np.mean(add_s)),
        "keygen_s": keygen_s,
        "decrypt_s": decrypt_s,
        "ciphertexts": len(encrypted),
        "max_abs_error": err,
        "tolerance": tolerance,
    }


def run_secure(args: argparse.Namespace) -> dict[str, Any]:
    """Bytes and seconds per client of each scheme in ``args.secure`` at one size (the child's JSON line)."""
    import gfmfr_secure  # noqa: F401  (first: sets the OpenMP wait policy before torch loads OpenMP)

    _, n_items = _parse_size(args.one_secure)
    layout, cfg, rows = secure_layout_for(args.method, n_items, args.overrides)
    dim = layout.n_groups * layout.block_size
    neighbours = args.secure_neighbours if args.secure_neighbours is not None else cfg.aggregation.neighbours
    if not 2 <= neighbours < args.secure_cohort or neighbours % 2:
        print(
            f"error: SecAgg+ degree k = {neighbours} must be even, >= 2 and below the cohort {args.secure_cohort} "
            "(k = 0, the complete graph, would play all n clients over D): pass --secure-neighbours, e.g. 20",
            file=sys.stderr,
        )
        raise SystemExit(2)
    d, head = layout.latent_dim, layout.head_size
    sparse = rows * (8 + 4 * d) + 4 * head + 8  # as plain_cost: int64 id + d float32 per touched row, the head delta, the group
    schemes = [
        {"scheme": "plain-sparse", "label": "plain item-sparse", "bytes_up": float(sparse), "bytes_down": None, "client_s": None, "server_s_per_client": None},
        {"scheme": "plain-dense", "label": "plain dense float32", "bytes_up": 4.0 * dim, "bytes_down": None, "client_s": None, "server_s_per_client": None},
    ]
    for scheme in args.secure:  # one measurement each, at most two
        _peak_reset()
        t0 = time.perf_counter()
        if scheme == "masking":
            row = measure_masking(layout, cfg, rows, neighbours, args.seed)
        else:
            row = measure_ckks(layout, cfg, rows, args.secure_clients, args.secure_cohort, args.seed)
        row["wall_s"] = time.perf_counter() - t0
        row["peak_rss_mib"] = _peak_mib()
        schemes.append(row)
    return {
        "method": args.method,
        "items": n_items,
        "groups": layout.n_groups,
        "latent_dim": d,
        "head": head,
        "dim": dim,
        "touched_rows": rows,
        "cohort": args.secure_cohort,
        "schemes": schemes,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def print_secure(r: dict[str, Any]) -> None:
    """The per-client cost table of one (method, size), and the trade-off it shows."""
    if "failed" in r:
        print(f"secure aggregation, {r['method']} {r['items']} items: FAILED ({r['failed']})", flush=True)
        return
    n, g, i, d, h = r["cohort"], r["groups"], r["items"], r["latent_dim"], r["head"]
    print(
        f"secure aggregation, {r['method']} on {i} items, cohort n = {n}: dense layout D = G * (I*d + H + 1) = "
        f"{g} * ({i}*{d} + {h} + 1) = {r['dim']:,} values; item-sparse: {r['touched_rows']} touched rows per client "
        f"({round(_MEAN_INTERACTIONS) - _HELD_OUT} positives and their negatives)",
        flush=True,
    )
    sparse = r["schemes"][0]["bytes_up"]
    header = f"  {'upload':<34} {'bytes up/client':>15} {'x sparse':>9} {'down/client':>12} {'client s':>9} {'server s/client':>15} {f'server s, n={n}':>15}"
    print(header, flush=True)
    for s in r["schemes"]:
        server = s["server_s_per_client"]
        print(
            f"  {s['label']:<34} {_fmt_bytes(s['bytes_up']):>15} {s['bytes_up'] / sparse:>9.1f} {_fmt_bytes(s['bytes_down']):>12} "
            f"{'-' if s['client_s'] is None else format(s['client_s'], '.3f'):>9} {'-' if server is None else format(server, '.4f'):>15} "
            f"{'-' if server is None else format(server * n, '.1f'):>15}",
            flush=True,
        )
    for s in r["schemes"][2:]:
        extra = (
            f"key rounds {s['client_key_s']:.3f} s + masks {s['client_mask_s']:.3f} s + layout {s['layout_s']:.3f} s per client"
            if s["scheme"] == "masking"
            else f"{s['ciphertexts']} ciphertexts; keys {s['keygen_s']:.2f} s and decryption {s['decrypt_s']:.2f} s once per round; "
            f"error {s['max_abs_error']:.2e} (tolerance {s['tolerance']:.2e})"
        )
        if s["scheme"] == "masking":
            extra += f"; error {s['max_abs_error']:.2e}"
        print(f"  {s['scheme']}: measured on {s['clients_played']} clients in {s['wall_s']:.1f} s, peak RSS {s['peak_rss_mib'] / 1024:.2f} GiB; {extra}", flush=True)
    print(
        f"  server s for n = {n}: the measured per-client server time times n (linear extrapolation, no dropouts, one core); "
        "client s is what each client spends on its own device",
        flush=True,
    )
    print(
        f"  trade-off: the dense layout hides which item rows a client touched, at a cost proportional to I*d*G "
        f"({r['dim']:,} values, {r['schemes'][1]['bytes_up'] / sparse:.0f}x the item-sparse upload before any protocol overhead); "
        f"item-sparse uploads cost ~ the {r['touched_rows']} touched rows but reveal each client's item set to the server",
        flush=True,
    )


# --------------------------------------------------------------------------- the grid (parent process)


def _parse_size(text: str) -> tuple[int, int]:
    """``"20000x10000"`` -> (20000, 10000); argparse reports an ArgumentTypeError with exit status 2."""
    try:
        users, items = (int(float(x)) for x in text.strip().lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not USERSxITEMS (e.g. 20000x10000)") from None
    if users < 10 or items < 10:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small: use at least 10 users and 10 items")
    return users, items


def _parse_methods(text: str) -> list[str]:
    methods = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [m for m in methods if m not in _CONFIGS]
    if not methods or unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}: choose from {', '.join(sorted(_CONFIGS))}")
    return methods


def _parse_sizes(text: str) -> list[str]:
    sizes = [part.strip() for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError("no size given: use e.g. --sizes 10000x5000,20000x10000")
    for size in sizes:
        _parse_size(size)
    return sizes


def _parse_schemes(text: str) -> list[str]:
    schemes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [x for x in schemes if x not in _SCHEMES]
    if not schemes or unknown:
        raise argparse.ArgumentTypeError(f"unknown secure scheme(s) {unknown or text!r}: choose from {', '.join(_SCHEMES)}")
    return list(dict.fromkeys(schemes))


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(size: str, method: str, args: argparse.Namespace, *, secure: bool = False) -> dict[str, Any]:
    """Run one method at one size in a subprocess, killing it above ``--max-rss-gib``; its JSON result.

    ``secure``: measure the secure-aggregation costs (:func:`run_secure`) instead of training.
    """
    cmd = [sys.executable, __file__, "--one-secure" if secure else "--one", size, "--method", method, "--rounds", str(args.rounds),
           "--fraction", str(args.fraction), "--cohort", str(args.cohort), "--threads", str(args.threads), "--seed", str(args.seed),
           "--cache", args.cache]
    if secure:
        cmd += ["--secure", ",".join(args.secure), "--secure-clients", str(args.secure_clients), "--secure-cohort", str(args.secure_cohort)]
        if args.secure_neighbours is not None:
            cmd += ["--secure-neighbours", str(args.secure_neighbours)]
    for item in args.overrides:
        cmd += ["--set", item]
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=sys.stderr, cwd=_ROOT)
        killed: list[float] = []

        def watch() -> None:
            while proc.poll() is None:
                rss = _rss_mib(proc.pid)
                if rss > args.max_rss_gib * 1024:
                    killed.append(rss)
                    proc.kill()
                    return
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        rc = proc.wait()
        watcher.join()
        out.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
    users, items = _parse_size(size)
    if killed:
        return {"method": method, "users": users, "items": items, "failed": f"killed at {killed[0] / 1024:.1f} GiB RSS after {time.perf_counter() - t0:.0f} s"}
    if rc != 0 or not lines:
        return {"method": method, "users": users, "items": items, "failed": f"exit status {rc}"}
    return json.loads(lines[-1])


def print_result(r: dict[str, Any]) -> None:
    head = f"{r['method']} {r['users']} users x {r['items']} items"
    if "failed" in r:
        print(f"{head}: FAILED ({r['failed']})", flush=True)
        return
    print(
        f"{head} ({r['interactions']} interactions), {r['rounds']} rounds, cohort {r['cohort_mean']:.0f}: "
        f"total {r['total_s']:.1f} s, {r['round_s']:.2f} s per round, peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB, "
        f"{r['minor_faults'] / 1e6:.1f}M minor faults, CPU user {r['cpu_user_s']:.0f} s + system {r['cpu_system_s']:.0f} s, "
        f"client state {r['client_state_mib']:.1f} MiB, test on {r['eval_users']} users: HR@10 {r['test_hr10']:.4f} NDCG@10 {r['test_ndcg10']:.4f}",
        flush=True,
    )
    print(f"  per round: client {r['client_s']:.2f} s (negatives and training), server {r['round_s'] - r['client_s']:.2f} s "
          f"(grouping {r['grouping_s']:.2f} s, fusion and teacher {r['fusion_s']:.2f} s)", flush=True)
    for p in _PHASES:
        v = r["phases"][p]
        print(f"  {p:<16} {v['s']:8.2f} s in {v['calls']:3d} calls   peak {v['peak_mib'] / 1024:6.2f} GiB", flush=True)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Log-log plot: time per round and peak RSS against users x items and against interactions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "failed" not in r]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for method in sorted({r["method"] for r in ok}):
        rows = sorted((r for r in ok if r["method"] == method), key=lambda r: r["users"] * r["items"])
        for col, (xkey, xlabel) in enumerate(((lambda r: r["users"] * r["items"], "users x items"), (lambda r: r["interactions"], "interactions"))):
            x = [xkey(r) for r in rows]
            axes[0, col].plot(x, [r["round_s"] for r in rows], "o-", label=method)
            axes[1, col].plot(x, [r["peak_rss_mib"] / 1024 for r in rows], "o-", label=method)
            axes[1, col].set_xlabel(xlabel)
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0, 0].set_ylabel("seconds per round (validation excluded)")
    axes[1, 0].set_ylabel("peak RSS (GiB)")
    fig.suptitle("bench_scale: synthetic Zipf data, time per round and peak memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=_parse_sizes, default=_DEFAULT_SIZES, help=f"comma-separated USERSxITEMS (default {_DEFAULT_SIZES})")
    ap.add_argument("--method", type=_parse_methods, default="fedrap", help=f"comma-separated methods from {', '.join(sorted(_CONFIGS))} (default fedrap)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.01, help="train.client_fraction (default 0.01)")
    ap.add_argument("--cohort", type=int, default=0, help="expected cohort size instead: fraction = COHORT / users at every size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gfmfr-bench-scale"), help="folder of the generated datasets")
    ap.add_argument("--out", default="bench_scale", help="prefix of the JSON and PNG written (default ./bench_scale)")
    ap.add_argument("--max-rss-gib", type=float, default=10.0, help="kill a size's process above this resident size")
    ap.add_argument("--secure", type=_parse_schemes, default=[], help="also print the per-client cost of secure aggregation at each size: "
                    "comma-separated schemes from masking,ckks (dense group-indexed uploads against item-sparse ones)")
    ap.add_argument("--secure-clients", type=int, default=4, help="ckks: clients actually encrypted (K, default 4); masking plays one "
                    "SecAgg+ neighbourhood of k + 1 clients; per-client costs are extrapolated linearly to --secure-cohort")
    ap.add_argument("--secure-cohort", type=int, default=1000, help="cohort n of the secure sum (default 1000): sizes the CKKS "
                    "parameters and the extrapolated server time")
    ap.add_argument("--secure-neighbours", type=int, default=None, help="masking: SecAgg+ degree k (even, >= 2; default aggregation.neighbours)")
    ap.add_argument("--secure-only", action="store_true", help="with --secure: skip the training runs")
    ap.add_argument("--one", type=lambda text: _parse_size(text) and text, help=argparse.SUPPRESS)  # child mode: run one size, print its JSON line
    ap.add_argument("--one-secure", type=lambda text: _parse_size(text) and text, help=argparse.SUPPRESS)  # child mode: secure costs at one size
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if not 0.0 < args.fraction <= 1.0:
        ap.error(f"--fraction must lie in (0, 1], got {args.fraction}")
    if args.cohort < 0:
        ap.error(f"--cohort must be >= 0 (0: use --fraction), got {args.cohort}")
    if args.secure_clients < 1:
        ap.error(f"--secure-clients must be >= 1, got {args.secure_clients}")
    if args.secure_cohort < 3:
        ap.error(f"--secure-cohort must be >= 3, got {args.secure_cohort}")
    if args.secure_neighbours is not None and (args.secure_neighbours < 2 or args.secure_neighbours % 2 or args.secure_neighbours >= args.secure_cohort):
        ap.error(f"--secure-neighbours must be even, >= 2 and below --secure-cohort, got {args.secure_neighbours}")
    if args.secure_only and not args.secure:
        ap.error("--secure-only needs --secure masking,ckks (or one of them)")
    if args.one or args.one_secure:
        if len(args.method) != 1:
            ap.error("--one and --one-secure run a single method")
        args.method = args.method[0]
        print(json.dumps(run_secure(args) if args.one_secure else run_one(args)), flush=True)
        return 0
    out = Path(args.out)
    results: list[dict[str, Any]] = []
    secure: list[dict[str, Any]] = []
    for method in args.method:
        for size in args.sizes:
            if not args.secure_only:
                results.append(run_child(size, method, args))
                print_result(results[-1])
            if args.secure:
                secure.append(run_child(size, method, args, secure=True))
                print_secure(secure[-1])
    if secure:
        out.with_name(out.name + "-secure.json").write_text(json.dumps(secure, indent=1))
        print(f"wrote {out.with_name(out.name + '-secure.json')}")
    if results:
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        plot(results, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0 if all("failed" not in r for r in results + secure) else 1


if __name__ == "__main__":
    sys.exit(main())
