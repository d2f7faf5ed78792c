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

    # the loop's collaborators, wrapped where the loop looks them up
    store_cls = state_mod.ClientStateStore
    create, snapshot = store_cls.create.__func__, store_cls.snapshot  # type: ignore[attr-defined]
    patches: dict[tuple[Any, str], Any] = {
        (store_cls, "create"): classmethod(ph.wrap("client state", create)),
        (store_cls, "snapshot"): ph.wrap("client state", snapshot),
        (loop, "sample_training"): ph.wrap("negatives", loop.sample_training),
        (loop, "train_cohort"): ph.wrap("client training", loop.train_cohort),
        (loop, "clip_upload"): ph.wrap("aggregation", loop.clip_upload),
        (loop, "count_phase"): ph.wrap("aggregation", loop.count_phase),
        (loop, "group_clients"): ph.wrap("server", loop.group_clients),
        (loop, "apply_fedavg_"): ph.wrap("server", loop.apply_fedavg_),
        (loop, "update_teacher_"): ph.wrap("server", loop.update_teacher_),
        (loop, "oblivious_groups"): ph.wrap("client state", loop.oblivious_groups),
        (loop, "evaluate_ranking"): ph.wrap("evaluation", loop.evaluate_ranking),
    }
    make_aggregator = loop.get_aggregator

    def get_aggregator(*a: Any, **k: Any) -> Any:
        agg = make_aggregator(*a, **k)
        agg.aggregate = ph.wrap("aggregation", agg.aggregate)
        return agg

    patches[(loop, "get_aggregator")] = get_aggregator
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


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(size: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one method at one size in a subprocess, killing it above ``--max-rss-gib``; its JSON result."""
    cmd = [sys.executable, __file__, "--one", size, "--method", method, "--rounds", str(args.rounds), "--fraction", str(args.fraction),
           "--cohort", str(args.cohort), "--threads", str(args.threads), "--seed", str(args.seed), "--cache", args.cache]
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
    ap.add_argument("--one", type=lambda text: _parse_size(text) and text, help=argparse.SUPPRESS)  # child mode: run one size, print its JSON line
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if not 0.0 < args.fraction <= 1.0:
        ap.error(f"--fraction must lie in (0, 1], got {args.fraction}")
    if args.cohort < 0:
        ap.error(f"--cohort must be >= 0 (0: use --fraction), got {args.cohort}")
    if args.one:
        if len(args.method) != 1:
            ap.error("--one runs a single method")
        args.method = args.method[0]
        print(json.dumps(run_one(args)), flush=True)
        return 0
    results = []
    for method in args.method:
        for size in args.sizes:
            result = run_child(size, method, args)
            print_result(result)
            results.append(result)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0 if all("failed" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
