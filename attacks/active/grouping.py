"""Attack 2: crafted oblivious-grouping centroids that put one target alone in a group.

Threat model: the server runs oblivious grouping and broadcasts the G centroids, which it
may craft. It knows the grouping feature of every cohort member (each client's clipped
head change of the previous round): the strongest assumption, e.g. from an earlier
``plain`` round or colluding clients. Each client picks its nearest centroid itself
(:func:`gfmfr_secure.server.grouping.nearest_centroid`).

:func:`isolating_centroids` places centroid ``trap`` on the target's feature and every
other centroid a short step ``eps * u`` away along a direction ``u`` on which every other
client lies further out than the target, ``(f_j - f_t) . u >= 1`` (a linear program; it
exists exactly when the target is a vertex of the convex hull of the features, which in
high dimension most clients are). Then the target alone is nearest to ``trap``.

Without the group floor the released sum of group ``trap`` is the target's exact update.
With it (``grouping.min_group_size``) the count phase reveals a count of 1 and the clients
merge the group into its nearest neighbour before any sum is released. What the floor
cannot see is a server that *lies about the counts* (:func:`lying_counts`: it reports
``min_group_size`` for ``trap``): the clients then keep the singleton group and its sum is
again the target's update. The client-side check against that is
:func:`gfmfr_secure.client.checks.verify_count_transcript`, which the round loop runs on the
count phase's transcript (``masking``) or the key holder's release (``ckks``): the lie is
refused and the round releases nothing.

:func:`centroid_attack` runs this server inside :func:`gfmfr_secure.simulation.loop.run_federated`
(two rounds: it learns the features in round 0 and isolates the target in round 1) as an
:class:`~gfmfr_secure.roles.active.ActiveServer` that replaces the server's centroid update
and, when lying, the counts it reports.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linprog

from attacks.active.harness import target_inference
from attacks.active.unmasking import ProtocolRound
from gfmfr_secure.data import InteractionData, Split
from gfmfr_secure.roles.active import ActiveServer
from gfmfr_secure.simulation import loop
from gfmfr_secure.simulation.group_floor import count_phase
from gfmfr_secure.types import AdversaryView, CohortUpdate

__all__ = ["centroid_attack", "count_phase_round", "isolable_fraction", "isolating_centroids", "lying_counts"]


def _separating_direction(features: np.ndarray, target: int) -> np.ndarray | None:
    """u [f] with ``(f_j - f_t) . u >= 1`` for every j != t, smallest L1 norm; None if none exists."""
    x = np.asarray(features, dtype=np.float64)
    diff = np.delete(x - x[target], target, axis=0)  # [n - 1, f]
    f = x.shape[1]
    # u = u_plus - u_minus, both >= 0; minimise sum(u_plus + u_minus) s.t. -diff @ u <= -1
    res = linprog(np.ones(2 * f), A_ub=np.hstack([-diff, diff]), b_ub=-np.ones(diff.shape[0]), bounds=(0, None), method="highs")
    if res.status != 0:
        return None
    return res.x[:f] - res.x[f:]


def isolating_centroids(features: np.ndarray, target: int, n_groups: int, *, trap: int = 0) -> np.ndarray:
    """float64 [G, f] centroids to which only row ``target`` of ``features`` [n, f] is nearest at ``trap``.

    Raises
    ------
    ValueError
        No such centroids exist (the target lies inside the convex hull of the others), or G < 2.
    """
    if n_groups < 2 or not 0 <= trap < n_groups:
        raise ValueError(f"need G >= 2 and trap in [0, G), got G={n_groups}, trap={trap}")
    x = np.asarray(features, dtype=np.float64)
    u = _separating_direction(x, target)
    if u is None:
        raise ValueError(f"client at position {target} lies inside the convex hull of the others: no centroid isolates it")
    # c_g = f_t + eps_g u with 0 < eps_g <= 1 / |u|^2: every other client is nearer to c_g than to f_t
    eps = np.arange(1, n_groups + 1) / (n_groups * float(u @ u))
    centroids = x[target] + eps[:, None] * u[None, :]
    centroids[trap] = x[target]
    return centroids


def isolable_fraction(features: np.ndarray) -> float:
    """Share of the clients (rows of ``features`` [n, f]) that crafted centroids can isolate."""
    x = np.asarray(features, dtype=np.float64)
    return float(np.mean([_separating_direction(x, i) is not None for i in range(x.shape[0])]))


def lying_counts(counts: np.ndarray, trap: int, floor: int) -> np.ndarray:
    """The counts a lying server reports: the trap group raised to the floor, so nobody merges it."""
    out = np.asarray(counts, dtype=np.float64).copy()
    out[trap] = max(out[trap], float(floor))
    return out


def centroid_attack(
    cfg: Any, data: InteractionData, split: Split, target: int | None = None, *, floor_on: bool = True, lie: bool = False, trap: int = 0,
    participants: np.ndarray | None = None, counts_checked: bool = True,
) -> dict[str, Any]:
    """Two rounds of oblivious grouping against a server that isolates ``target`` in round 1.

    Parameters
    ----------
    cfg : a GFMFR config with ``grouping.method: oblivious`` and every client in every
        round (``train.client_fraction: 1``).
    target : user id of the target, or None: the server picks the first client (in cohort
        order) that crafted centroids can isolate.
    floor_on : False replaces the clients' merge by the identity (no group floor).
    lie : the server reports the trap group's count as ``grouping.min_group_size``.
    counts_checked : False bypasses the clients' count check in the loop (they accept any
        reported counts, as before the check was wired in).
    participants : int64 user ids that take part (default: every user with training data).

    Returns
    -------
    dict: ``refused`` (the clients' refusal of round 1, or None: then the rest), ``target``, ``isolable`` (the share of round 0's clients crafted centroids can
    isolate), ``counts`` (the counts released in round 1's sums), ``group`` (the block that
    carried the target), ``isolated`` (that block's count is 1), ``gap`` (largest absolute
    difference between that block's item-table sum and the target's upload), and
    ``inference`` (:func:`attacks.active.harness.target_inference` on that block).
    """
    seen: dict[int, CohortUpdate] = {}
    state: dict[str, Any] = {"target": target}

    def hook(upload: CohortUpdate, t: int) -> CohortUpdate:
        seen[t] = upload  # the server's auxiliary knowledge: every client's grouping feature
        if t == 1:
            state["upload"] = upload.dense_item_delta(int(np.flatnonzero(upload.clients == state["target"])[0]), split.n_items)
        return upload

    def crafted_centroids(centroids: np.ndarray | None, agg: Any) -> np.ndarray:
        last = seen[max(seen)]
        features = last.head_delta.double().numpy()
        if state["target"] is None:
            state["target"] = int(last.clients[next(i for i in range(len(last)) if _separating_direction(features, i) is not None)])
        state.setdefault("isolable", isolable_fraction(features))
        position = int(np.flatnonzero(last.clients == state["target"])[0])
        return isolating_centroids(features, position, cfg.grouping.num_groups, trap=trap)

    def lying_count_phase(*args: Any, **kwargs: Any) -> tuple[np.ndarray, dict[str, float]]:
        counts, cost = count_phase(*args, **kwargs)
        return lying_counts(counts, trap, cfg.grouping.min_group_size), cost

    def no_merge(counts: np.ndarray, centroids: np.ndarray | None, floor: int) -> np.ndarray:
        return np.arange(len(counts))

    server = ActiveServer(
        centroid_step=crafted_centroids, merge_groups=None if floor_on else no_merge, count_phase=lying_count_phase if lie else None,
        counts_checked=counts_checked,
    )
    views: list[AdversaryView] = []
    run = loop.run_federated(cfg, data, split, progress=False, upload_hook=hook, callbacks=[views.append], participants=participants, active_server=server)
    refused = run.history[1].get("refused")
    if refused is not None:  # nothing was released in round 1
        return {"refused": refused, "target": state["target"], "isolable": state["isolable"], "isolated": False}
    view = next(v for v in views if v.observer == "server" and v.round == 1)
    received, target = view.received, state["target"]
    group = int(view.truth["groups"][np.flatnonzero(view.truth["clients"] == target)[0]])
    block = received["group_item_sum"][group]
    counts = received["group_counts"].double().numpy()
    return {
        "refused": None,
        "target": target,
        "isolable": state["isolable"],
        "counts": counts.tolist(),
        "group": group,
        "isolated": bool(abs(counts[group] - 1.0) < 1e-3),
        "gap": float((block - state["upload"]).abs().max()),
        "inference": target_inference(block.numpy(), split.train_of(target)),
    }


def count_phase_round(groups: np.ndarray, n_groups: int, *, threshold: int, neighbours: int | None = None, round_id: int = 0) -> ProtocolRound:
    """The count phase of an oblivious round as a protocol run: client u uploads the one-hot of ``groups[u]`` [G].

    Returns the finished round; its :meth:`~attacks.active.unmasking.ProtocolRound.transcript`
    is what each client replays in :func:`gfmfr_secure.client.checks.verify_count_transcript`.
    """
    g = np.asarray(groups, dtype=np.int64)
    rnd = ProtocolRound.start(g.size, n_groups, threshold=threshold, neighbours=neighbours, round_id=round_id)
    rnd.upload(np.eye(n_groups, dtype=np.float32)[g])
    rnd.finish()
    return rnd
