"""Time GFMFR rounds at the default config on ML-100K-mm.

Prints, per round, seconds of client training (all clients, vectorised cohort), of the
server update (FedAvg, spectral grouping, fusion training, teacher; grouping and
fusion also on their own) and of a
full-ranking evaluation of all users, plus peak resident memory.

    python benchmarks/bench_round.py --data ../shared/datasets/ml-100k-mm --rounds 3
    python benchmarks/bench_round.py --rounds 3 --set fusion.compile=true

With ``fusion.compile=true`` round 0 includes the one-off compilation of the fusion
step; the mean over rounds 1.. excludes it.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import gfmfr_secure  # noqa: F401  (first: sets the OpenMP wait policy before torch loads OpenMP)

# isort: split
import torch

from gfmfr_secure.config import load_config
from gfmfr_secure.metrics import evaluate_ranking
from gfmfr_secure.simulation import loop
from gfmfr_secure.simulation.runner import prepare_data
from gfmfr_secure.simulation.scoring import score_users


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("GFMFR_DATA", "../shared/datasets/ml-100k-mm"))
    ap.add_argument("--config", default="configs/gfmfr.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"data.path={args.data}", f"train.rounds={args.rounds}", "train.patience=0", *args.overrides])
    t = time.perf_counter()
    data, split = prepare_data(cfg)
    print(f"load + split: {time.perf_counter() - t:.2f} s ({data.n_users} users, {data.n_items} items)")
    run = loop.run_federated(cfg, data, split, progress=False)
    for rec in run.history:
        parts = f"grouping {rec['grouping_s']:.2f} s, fusion + teacher {rec.get('fusion_s', 0.0):.2f} s"
        print(
            f"round {rec['round']}: client {rec['client_s']:.2f} s, server {rec['server_s']:.2f} s ({parts}), "
            f"val NDCG@10 {rec['val']['NDCG@10']:.4f}"
        )
    users = torch.arange(split.n_users)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        evaluate_ranking(lambda u: score_users(run.shared, run.store, loop.get_backbone(cfg.model.backbone), u, scorer=cfg.model.scorer), split, "test", chunk_size=cfg.eval.chunk_users)
        times.append(time.perf_counter() - t)
    _print_arithmetic(cfg, split, data)
    rounds = run.history[1:] or run.history  # round 0 has no distillation; report steady state
    client = sum(r["client_s"] for r in rounds) / len(rounds)
    server = sum(r["server_s"] for r in rounds) / len(rounds)
    fusion = sum(r.get("fusion_s", 0.0) for r in rounds) / len(rounds)
    grouping = sum(r["grouping_s"] for r in rounds) / len(rounds)
    print(f"mean over rounds {rounds[0]['round']}..{rounds[-1]['round']}: client {client:.2f} s + server {server:.2f} s = {client + server:.2f} s per round")
    print(f"  server: grouping {grouping:.2f} s, fusion training + teacher {fusion:.2f} s, FedAvg and the rest {server - grouping - fusion:.2f} s")
    print(f"full-ranking evaluation of {users.numel()} users: best {min(times):.2f} s")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"private client state: {run.store.nbytes / 2**20:.1f} MiB")
    return 0


def _print_arithmetic(cfg, split, data) -> None:
    """Matrix-product work of one round (2 FLOP per multiply-add), the floor the timings race against.

    Client: every sample-step costs three d x h products (forward, weight gradient,
    input gradient). Server (when distilling): each fusion epoch projects every item's
    features once, forward and weight gradient; with ``moe`` every (group, item) pair
    also runs the mlp expert's output layer (three 2d x d products) and the router's
    first layer on that expert (three d x h products, h = d).
    """
    d = cfg.model.latent_dim
    samples = float(split.train_counts().sum()) * (1 + cfg.train.num_negatives) * cfg.train.local_epochs * cfg.train.client_fraction
    client = samples * 3 * d * d * 2
    line = f"arithmetic per round: client {client / 1e9:.0f} GFLOP ({samples / 1e6:.2f}M sample-steps)"
    if cfg.distill.enabled:
        widths = {"text": data.text_features, "image": data.image_features}
        feat = sum(int(widths[m].shape[1]) for m in cfg.fusion.modalities if widths.get(m) is not None)
        n_items, epochs, groups = split.n_items, cfg.fusion.server_epochs, cfg.grouping.num_groups
        proj = epochs * n_items * feat * d * 2 * 2
        grid = epochs * n_items * groups * (3 * 2 * d * d + 3 * d * d) * 2 if cfg.fusion.operator == "moe" else 0.0
        line += f", fusion projections {proj / 1e9:.0f} GFLOP"
        line += f" + moe grid {grid / 1e9:.0f} GFLOP" if grid else " (per-pair operator work not counted)"
    print(line)


if __name__ == "__main__":
    sys.exit(main())
