"""``python -m attacks.active``: measure every active attack of this package and print the figures.

Markdown tables on stdout, one per attack (the figures of ``docs/active-attacks.md``).
Settings with DP noise are repeated (``--repeats``) with fresh OS secrets and reported as
mean and standard deviation; the others are deterministic.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import numpy as np

from attacks.active import unmasking as um
from attacks.active.broadcast import broadcast_attack
from attacks.active.grouping import centroid_attack
from attacks.active.sybil import sybil_attack
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out, load_dataset, make_synthetic
from gfmfr_secure.errors import GfmfrError
from gfmfr_secure.secagg.masking import SecAggConfig
from gfmfr_secure.simulation.dp import plan_privacy

#: small GFMFR rounds for the loop-driven centroid attack
LOOP = [
    "train.rounds=2", "train.local_epochs=1", "train.batch_size=16", "train.lr=0.05", "train.item_lr_scale=20",
    "fusion.server_epochs=1", "fusion.embedding_dim=16", "grouping.num_groups=3", "eval.ks=[5,10]", "train.patience=0",
    "grouping.method=oblivious", "aggregation.backend=masking", "train.selection=last",
]
DP = ["privacy.clip=0.02", "train.rounds=20", "train.selection=last"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attacks.active", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset folder or interactions CSV (default: synthetic, 60 users x 80 items, as in the tests)")
    p.add_argument("--users", type=int, default=20, help="cohort of the broadcast and Sybil attacks: the first N users with training data (default 20)")
    p.add_argument("--loop-users", type=int, default=60, help="users taking part in the loop-driven centroid attack (default 60)")
    p.add_argument("--dim", type=int, default=16, help="latent size d of the broadcast and Sybil attacks (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of each setting with DP noise (default 5)")
    return p


def _mean(runs: Sequence[dict[str, float]], key: str) -> str:
    vals = np.array([r[key] for r in runs], dtype=np.float64)
    return f"{vals.mean():.3g}" if vals.size == 1 or vals.std() == 0 else f"{vals.mean():.3g} ± {vals.std():.2g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _repeat(fn: Callable[[], dict[str, float]], times: int) -> list[dict[str, float]]:
    return [fn() for _ in range(max(1, times))]


def broadcast_section(cfg: Any, split: Any, cohort: np.ndarray, repeats: int) -> str:
    target = int(cohort[0])
    settings: list[tuple[str, dict[str, Any], Any, int]] = [
        ("honest broadcast", {"mode": "honest"}, cfg, 1),
        ("crafted, to the target only", {"mode": "inconsistent"}, cfg, 1),
        ("crafted, to the target only, consistency check on", {"mode": "inconsistent", "check": True}, cfg, 1),
        ("crafted, to everyone, consistency check on", {"mode": "uniform", "check": True}, cfg, 1),
    ]
    for label, extra in (("clip C = 0.02, no noise", ["privacy.noise_multiplier=0"]), ("distributed DP, epsilon 8", ["privacy.epsilon=8"]), ("distributed DP, epsilon 2", ["privacy.epsilon=2"])):
        dp_cfg = with_overrides(cfg, ["privacy.mechanism=distributed", *DP, *extra])
        settings.append((f"crafted, to the target only, {label}", {"mode": "inconsistent", "dp": plan_privacy(dp_cfg, cohort.size)}, dp_cfg, 1 if "no noise" in label else repeats))
    rows = []
    for label, kwargs, c, times in settings:
        outs = [broadcast_attack(c, split, cohort, target, **kwargs) for _ in range(times)]
        runs = [o.metrics for o in outs]
        rows.append([label, "yes" if outs[0].refused and target in outs[0].refused else "no", _mean(runs, "auc"), _mean(runs, "f1_at_k"), _mean(runs, "f1_threshold"), _mean(runs, "exact"), f"{outs[0].target_norm:.3g}", times])
    return _table(["setting", "target refused", "AUC", "F1 at k (oracle)", "F1 (known step)", "exact", "target update norm", "runs"], rows)


def centroid_section(cfg: Any, data: Any, split: Any, participants: np.ndarray) -> str:
    rows, target = [], None
    settings = (
        ("crafted centroids, no floor", {"floor_on": False}),
        ("crafted centroids, floor 10", {}),
        ("crafted centroids, floor 10, lying counts, count check bypassed", {"lie": True, "counts_checked": False}),
        ("crafted centroids, floor 10, lying counts, count check on", {"lie": True}),
    )
    for label, kwargs in settings:
        out = centroid_attack(cfg, data, split, target, participants=participants, **kwargs)
        target = out["target"]
        if out["refused"] is not None:
            rows.append([label, f"{out['isolable']:.3f}", "refused: nothing released", "-", "-", "-", 0])
            continue
        inf = out["inference"]
        rows.append([label, f"{out['isolable']:.3f}", int(round(out["counts"][out["group"]])), f"{out['gap']:.2g}", f"{inf['auc']:.3f}", f"{inf['f1_sign']:.3f}", inf["exact"]])
    return _table(["setting", "isolable share of clients", "count of the target's released group", "max gap to the target's upload", "AUC", "F1 (sign)", "exact"], rows)


def _no_majority(self: Any, graph: Any) -> None:
    if self.threshold > graph.neighbourhood_size:
        raise ValueError("threshold too large")


def unmasking_section() -> str:
    rows = []
    rng = np.random.default_rng(0)
    for n, t, c in ((6, 4, 0), (6, 4, 1), (6, 4, 2), (11, 6, 0), (11, 6, 1), (11, 6, 2)):
        rnd = um.ProtocolRound.start(n, 16, threshold=t)
        rnd.upload(rng.uniform(-1, 1, size=(n, 16)).astype(np.float32))
        col = list(range(n - c, n))
        got = um.collect_shares(rnd, um.victim_split_plan(rnd, 0, col), col)
        b, s = len(got.self_mask.get(0, [])), len(got.mask_key.get(0, []))
        rows.append(["victim split", n, t, c, f"b: {b}, mask key: {s}", "yes" if min(b, s) >= t else "no"])
    for n, t in ((6, 3), (6, 4), (10, 5), (10, 6), (20, 10), (20, 11), (21, 11)):
        with mock.patch.object(SecAggConfig, "check_graph", _no_majority):
            rnd = um.ProtocolRound.start(n, 16, threshold=t)
        rnd.upload(rng.uniform(-1, 1, size=(n, 16)).astype(np.float32))
        got = um.collect_shares(rnd, um.fake_dropout_plan(rnd, 0))
        fewest = min(len(got.mask_key.get(w, [])) for w in range(1, n))
        rows.append(["different dropout story per holder", n, t, 0, f"b: {len(got.self_mask[0])}, fewest mask-key shares: {fewest}", "yes" if fewest >= t else "no"])
    return _table(["attack", "n = |N[u]|", "t", "colluders", "shares collected", "target unmasked"], rows)


def sybil_section(cfg: Any, split: Any, cohort: np.ndarray, repeats: int) -> str:
    target, rows = int(cohort[0]), []
    settings = [("none", "masking", "none", ".inf")]
    settings += [(f"{mech}, epsilon {eps}", backend, mech, eps) for eps in ("8", "2") for backend, mech in (("masking", "distributed"), ("ckks", "central"), ("masking", "local"))]
    for label, backend, mech, eps in settings:
        c = with_overrides(cfg, [f"aggregation.backend={backend}", f"privacy.mechanism={mech}", f"privacy.epsilon={eps}", *DP])
        dp = plan_privacy(c, cohort.size + 9)
        runs = _repeat(lambda: sybil_attack(c, split, cohort, target, n_sybils=9, dp=dp), 1 if dp is None else repeats)
        rows.append([label, backend, "-" if dp is None else f"{dp.noise_multiplier:.3g}", _mean(runs, "relative_error"), _mean(runs, "auc"), _mean(runs, "f1_at_k"), _mean(runs, "exact"), len(runs)])
    return _table(["DP", "backend", "sigma", "relative error", "AUC", "F1 at k (oracle)", "exact", "runs"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # the secure sums need 2 clients; the loop's group floor is 10
    for name, least in (("users", 2), ("loop_users", 10), ("dim", 1), ("repeats", 1)):
        if getattr(args, name) < least:
            print(f"error: --{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        data = make_synthetic(60, 80, n_groups=3, mean_interactions=12, text_dim=8, image_dim=6, seed=7) if args.data is None else load_dataset(args.data)
    except (GfmfrError, OSError) as err:
        print(f"error: cannot load --data {args.data}: {err}; pass a dataset folder or an interactions CSV file, or leave --data out for the synthetic data", file=sys.stderr)
        return 2
    split = leave_one_out(data)
    active = np.flatnonzero(split.train_counts() > 0)
    cohort, participants = active[: args.users], active[: args.loop_users]
    base = with_overrides(config_from_dict({"method": "gfmfr"}), [f"model.latent_dim={args.dim}", "aggregation.backend=masking", "aggregation.neighbours=0", "grouping.method=oblivious"])
    broadcast_cfg = with_overrides(config_from_dict({"method": "fedrap"}), ["distill.enabled=false", f"model.latent_dim={args.dim}", "aggregation.backend=masking", "aggregation.neighbours=0"])
    loop_cfg = with_overrides(config_from_dict({"method": "gfmfr"}), [*LOOP, "model.latent_dim=8", "aggregation.neighbours=8"])
    sections = (
        ("1. Crafted broadcast (FedRAP, masking, complete graph)", lambda: broadcast_section(broadcast_cfg, split, cohort, args.repeats)),
        ("2. Crafted centroids (GFMFR, oblivious grouping, masking, 2 rounds)", lambda: centroid_section(loop_cfg, data, split, participants)),
        ("3 and 4. Lying about dropouts (complete graph)", unmasking_section),
        ("5. Sybils in the target's group (9 Sybils, floor 10)", lambda: sybil_section(base, split, cohort, args.repeats)),
    )
    print(f"data: {'synthetic 60 x 80' if args.data is None else args.data}; cohort {cohort.size}, loop participants {participants.size}, d = {args.dim}")
    for title, run in sections:
        t0 = time.perf_counter()
        table = run()
        print(f"\n## {title} ({time.perf_counter() - t0:.1f} s)\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
