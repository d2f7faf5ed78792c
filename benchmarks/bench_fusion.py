"""Time the server's fusion step: ``train_fusion`` per operator, then ``forward_all`` + teacher.

Setting of a default GFMFR round on ML-100K: G=5 groups, I=1682 items,
text 384-d, image 1280-d, d=64, E=512, 50 epochs, batch 256, SGD, on
synthetic features and targets. Prints wall-clock and process CPU seconds (the
best of ``--repeats`` runs), and, for reference, the same training done the
plain way: shuffled batches of 256 (group, item) pairs through
``GroupFusion.forward``, which projects every item once per pair instead of once
per batch.

Run: ``python benchmarks/bench_fusion.py [--threads 1] [--repeats 3] [--operators sum moe] [--compiled]``

Each operator is timed with the eager steps; ``moe/numba`` is the Numba loop that
``train_fusion`` uses for moe with SGD by default (``server/fusion_kernel.py``).
``--compiled`` adds a row per operator that supports it (``fusion.compile``): each
step as one ``torch.compile``d graph. Compilation (Numba's, or loading it from its
disk cache; inductor's) is timed separately by a warm-up call on a throw-away
module and not counted in the training time.

One thread is the default, as in the training loop: under the passive OpenMP
waiting the package sets, a second thread makes these small steps slower (moe,
50 epochs: about 3 s on one thread, about 13 s on two, on the 2-core machine).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import gfmfr_secure  # noqa: F401  (first: sets the OpenMP wait policy before torch loads OpenMP)

# isort: split
import torch
import torch.nn.functional as F

from gfmfr_secure.rng import torch_generator
from gfmfr_secure.server import FUSION_OPERATORS, GroupFusion, group_preferences, train_fusion
from gfmfr_secure.server.fusion_training import compiled_supported, kernel_supported

G, I, DT, DV, D, E = 5, 1682, 384, 1280, 64, 512
EPOCHS, BATCH, LR = 50, 256, 0.002


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text [I, Dt], image [I, Dv] features and targets [G, I, d]."""
    gen = torch_generator(seed, "bench", "data")
    text = torch.randn(I, DT, generator=gen)
    image = torch.randn(I, DV, generator=gen)
    targets = 0.1 * torch.randn(G, I, D, generator=gen)
    return text, image, targets


def build(operator: str, text: torch.Tensor, image: torch.Tensor, seed: int) -> GroupFusion:
    return GroupFusion.from_features(
        G,
        D,
        text=text,
        image=image,
        embedding_dim=E,
        operator=operator,
        generator=torch_generator(seed, "bench", "init", operator),
    )


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def train_pairwise(module: GroupFusion, targets: torch.Tensor, gen: torch.Generator) -> list[float]:
    """Reference: batches of BATCH shuffled (group, item) pairs through ``forward``."""
    opt = torch.optim.SGD(module.parameters(), lr=LR, weight_decay=1e-4, foreach=True)
    n_pairs = G * I
    losses = []
    for _ in range(EPOCHS):
        perm = torch.randperm(n_pairs, generator=gen)
        total = 0.0
        for start in range(0, n_pairs, BATCH):
            idx = perm[start : start + BATCH]
            g_idx, i_idx = idx // I, idx % I
            loss = F.mse_loss(module(g_idx, i_idx), targets[g_idx, i_idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        losses.append(total / n_pairs)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--operators", nargs="*", default=sorted(FUSION_OPERATORS))
    parser.add_argument(
        "--pairwise",
        nargs="*",
        default=["sum", "moe"],
        help="operators also timed with the pairwise reference loop",
    )
    parser.add_argument("--compiled", action="store_true", help="also time the compiled step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text, image, targets = make_data(0)
    weight = 0.1 * torch.randn(G, D, generator=torch_generator(0, "bench", "head"))
    bias = torch.zeros(G)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, cpus={os.cpu_count()}, "
        f"load average {load:.2f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    print(
        f"G={G} I={I} Dt={DT} Dv={DV} d={D} E={E} epochs={EPOCHS} batch={BATCH} "
        f"(best of {args.repeats})"
    )
    print(
        f"{'operator':<10} {'train wall s':>12} {'train cpu s':>12} {'first loss':>11} "
        f"{'last loss':>10} {'all+teacher ms':>15}"
    )
    runs = [(op, "eager") for op in args.operators]
    runs += [(op, "numba") for op in args.operators if kernel_supported(build(op, text, image, 1), "sgd")]
    if args.compiled:
        runs += [(op, "compiled") for op in args.operators if compiled_supported(op, "sgd")]
    for operator, mode in runs:
        best = (math.inf, math.inf)
        losses: list[float] = []
        module = build(operator, text, image, 1)
        flags = {"compiled": mode == "compiled", "kernel": mode == "numba"}
        if mode != "eager":
            warm, _, _ = timed(
                lambda m=module, f=flags: train_fusion(
                    m, targets, epochs=1, batch_size=BATCH, lr=LR, generator=torch_generator(0, "warm"), **f
                )
            )
            print(f"{operator}/{mode}: compilation (or loading it from the cache) and one epoch {warm:.1f} s")
        for r in range(args.repeats):
            module = build(operator, text, image, 1)
            gen = torch_generator(0, "bench", "shuffle", r)
            wall, cpu, losses = timed(
                lambda m=module, g=gen, f=flags: train_fusion(
                    m, targets, epochs=EPOCHS, batch_size=BATCH, lr=LR, generator=g, **f
                )
            )
            best = min(best, (wall, cpu))
        infer = math.inf
        for _ in range(max(3, args.repeats)):

            def teacher(m=module):
                with torch.no_grad():
                    return group_preferences(m.forward_all(), weight, bias)

            infer = min(infer, timed(teacher)[0])
        label = operator + ("" if mode == "eager" else f"/{mode}")
        print(
            f"{label:<10} {best[0]:>12.3f} {best[1]:>12.3f} {losses[0]:>11.5f} "
            f"{losses[-1]:>10.5f} {1e3 * infer:>15.2f}"
        )
    for operator in args.pairwise:
        module = build(operator, text, image, 1)
        gen = torch_generator(0, "bench", "shuffle", "pairwise")
        wall, cpu, losses = timed(lambda m=module, g=gen: train_pairwise(m, targets, g))
        print(
            f"{operator + '/pairs':<10} {wall:>12.3f} {cpu:>12.3f} {losses[0]:>11.5f} "
            f"{losses[-1]:>10.5f} {'(reference)':>15}"
        )


if __name__ == "__main__":
    main()
