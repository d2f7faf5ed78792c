"""Attacks on recorded adversary views: what the server (or an outsider) actually received.

Every attack here reads one recorded round (``views/round{t}-{observer}.pt``, see
:mod:`gfmfr_secure.simulation.views`) plus declared auxiliary knowledge, and is
scored against ground truth the adversary never saw:

- **interaction inference** (server): for each client of the round, its training
  items against the same number of *popularity-matched* negatives (drawn from the same
  popularity bin, so a score that ignores the client, such as item popularity, has AUC
  about 0.5). Scores: the L2 norm of the client's uploaded
  item-table row (update-magnitude test) and IMIA (Yuan et al. 2023) under ``plain``;
  under a secure backend the server has only sums, so its best per-client score is the
  row norm of the released sum, identical for every client.
- **attribute inference** (server): gender and age bracket from each client's upload
  (row norms of its item-table update and its head update) with labels known for a
  fraction of users; the same classifier on raw interactions is the upper bound, the
  majority class the baseline. Without per-client data (secure backends) the features
  are constant.
- **group inference** (server, outsider): which group each client is in. Under
  ``plain`` with the paper's grouping the server assigned the groups itself; otherwise
  the adversary scores groups by the released group preferences on the user's known
  items.

The auxiliary knowledge granted: the adversary knows each target user's training
items for group inference (an outsider who knows a user's history), and labels of
``labelled_fraction`` of users for attribute inference.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.attribute import age_bracket, attribute_inference
from attacks.base import AttackResult
from attacks.grouping import group_inference
from attacks.interaction import dot_imia_row_scores, imia_row_scores
from attacks.metrics import attack_metrics
from attacks.reconstruction import (
    decide_by_count,
    decide_by_sign,
    fixed_direction_row_scores,
    positives_from_row_count,
    reconstruction_metrics,
)
from gfmfr_secure.models.params import unflatten_heads
from gfmfr_secure.privacy.release import NoiseShares, ReleaseLayout
from gfmfr_secure.simulation.views import load_view

__all__ = ["client_row_norms", "interaction_targets", "reconstruction_results", "run_view_attacks"]


def interaction_targets(split: Any, clients: np.ndarray, seed: int, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluation pairs: each client's training items (label 1) and as many popularity-matched negatives (0).

    Items are put in ``n_bins`` bins of equal interaction mass by training popularity; for
    every positive in bin ``b`` a negative is drawn uniformly from bin ``b``'s items the
    client did not interact with. Positives and negatives then have the same popularity
    profile, so a score that ignores the client (item popularity, or the row norms of a
    released sum) has AUC close to 0.5: what remains is leakage about the client.

    Returns
    -------
    pos : int64 [P] cohort position of each pair; items : int64 [P]; labels : int8 [P].
    """
    rng = np.random.default_rng(seed)
    pop = np.bincount(split.train_items, minlength=split.n_items).astype(np.float64)
    order = np.argsort(pop, kind="stable")
    mass = np.cumsum(pop[order]) / max(pop.sum(), 1.0)
    bin_of = np.empty(split.n_items, dtype=np.int64)
    bin_of[order] = np.minimum((mass * n_bins).astype(np.int64), n_bins - 1)
    members = [np.flatnonzero(bin_of == b) for b in range(n_bins)]
    pos_list, item_list, lab_list = [], [], []
    for j, u in enumerate(np.asarray(clients)):
        own = split.train_of(int(u))
        if own.size == 0:
            continue
        negs = []
        for b, count in zip(*np.unique(bin_of[own], return_counts=True)):
            cand = np.setdiff1d(members[b], own, assume_unique=True)
            if cand.size:
                negs.append(rng.choice(cand, size=int(count), replace=cand.size < count))
        neg = np.concatenate(negs) if negs else np.zeros(0, np.int64)
        pos_list.append(np.full(own.size + neg.size, j))
        item_list += [own, neg]
        lab_list += [np.ones(own.size, np.int8), np.zeros(neg.size, np.int8)]
    return np.concatenate(pos_list), np.concatenate(item_list).astype(np.int64), np.concatenate(lab_list)


def _shares(rec: dict[str, Any] | None) -> NoiseShares | None:
    if not rec:
        return None
    layout = ReleaseLayout(**rec["layout"])
    return NoiseShares(key=bytes(rec["key"]), round=rec["round"], clients=np.asarray(rec["clients"]), std=float(rec["std"]), layout=layout)


def client_row_norms(per_client: dict[str, Any], n_items: int, shares: dict[str, Any] | None) -> np.ndarray:
    """float32 [n, I]: L2 norm of each client's uploaded item-table row, as the server saw it.

    A sparse upload gives zeros on rows it did not send; with noise shares the upload is
    dense (every row carries the client's noise; its own group's block when laid out).
    """
    n = int(np.asarray(per_client["clients"]).size)
    delta = per_client["item_delta"]
    d = delta.shape[1]
    owner = np.repeat(np.arange(n), np.diff(per_client["row_ptr"]))
    noise = _shares(shares)
    if noise is None:
        norms = np.zeros((n, n_items), dtype=np.float32)
        norms[owner, per_client["row_items"]] = delta.norm(dim=1).numpy()
        return norms
    groups = np.asarray(per_client.get("group", np.zeros(n, np.int64)))
    out = np.empty((n, n_items), dtype=np.float32)
    for j in range(n):
        g = max(int(groups[j]), 0) if noise.layout.n_groups > 1 else 0
        dense = noise.client(j)[g, : n_items * d].reshape(n_items, d).clone()
        a, b = int(per_client["row_ptr"][j]), int(per_client["row_ptr"][j + 1])
        dense[torch.from_numpy(np.asarray(per_client["row_items"][a:b]))] += delta[a:b]
        out[j] = dense.norm(dim=1).numpy()
    return out


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric scalars of a metrics dict (nested dicts flattened with their key as prefix)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(scalar_metrics(v, f"{prefix}{k}_"))
        elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def one_vs_rest_metrics(labels: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Micro-averaged one-vs-rest ROC metrics of a classifier (AUC, TPR at 1% and 0.1% FPR).

    Every (target, class) pair is one decision "the target has this class", scored by
    the class score; rows with NaN scores are dropped.
    """
    keep = ~np.isnan(scores).any(axis=1)
    onehot = (np.asarray(labels)[keep, None] == np.asarray(classes)[None, :]).astype(np.int8)
    m = attack_metrics(onehot.ravel(), scores[keep].ravel())
    return {"auc_ovr": m["auc"], "tpr_at_fpr_0.01": m["tpr_at_fpr_0.01"], "tpr_at_fpr_0.001": m["tpr_at_fpr_0.001"]}


def _result(name: str, observer: str, y: np.ndarray, s: np.ndarray, details: dict[str, Any]) -> AttackResult:
    m = scalar_metrics(attack_metrics(y, s))
    return AttackResult(name=name, observer=observer, metrics=m, n_targets=int(y.size), details={**details, "roc": (y, s)})


def _imia(per_client: dict[str, Any], broadcast: dict[str, Any], n_items: int, positions: np.ndarray, seed: int, pos_fraction: float) -> np.ndarray:
    """IMIA scores [n_sel, I] for the clients at ``positions`` (rows not uploaded: -inf)."""
    ptr = np.asarray(per_client["row_ptr"])
    rows = [np.arange(ptr[j], ptr[j + 1]) for j in positions]
    idx = np.concatenate(rows)
    sub_ptr = np.concatenate([[0], np.cumsum([r.size for r in rows])])
    d = int(broadcast["latent_dim"])
    w1u, w1i, b1, w2, b2 = (t[0] for t in unflatten_heads(broadcast["head"].unsqueeze(0), d))
    items = np.asarray(per_client["row_items"])[idx]
    if not bool(w1i.any()):  # the dot scorer (its first layer is unused and zero): rows move along e_u + w2
        scores = dot_imia_row_scores(sub_ptr, per_client["item_delta"][torch.from_numpy(idx)].numpy(), pos_fraction=pos_fraction)
    else:
        scores = imia_row_scores(
            sub_ptr, items, per_client["item_delta"][torch.from_numpy(idx)].numpy(), broadcast["item_table"].numpy(),
            w1u.numpy(), w1i.numpy(), b1.numpy(), w2.numpy(), float(b2), seed=seed, pos_fraction=pos_fraction,
        )
    out = np.full((len(positions), n_items), -np.inf)
    owner = np.repeat(np.arange(len(positions)), np.diff(sub_ptr))
    out[owner, items] = scores
    return out


def _uploaded_truth(per_client: dict[str, Any], split: Any, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per uploaded row, whether it is the client's training positive; per client, positives not uploaded.

    Returns
    -------
    row_ptr int64 [n + 1], truth bool [R], missed int64 [n].
    """
    n_items = split.n_items
    ptr = np.asarray(per_client["row_ptr"], dtype=np.int64)
    items = np.asarray(per_client["row_items"], dtype=np.int64)
    n = ptr.size - 1
    owner = np.repeat(np.arange(n), np.diff(ptr))
    own = [split.train_of(int(u)) for u in clients]
    train_keys = np.concatenate([j * np.int64(n_items) + o for j, o in enumerate(own)] or [np.zeros(0, np.int64)])
    truth = np.isin(owner * np.int64(n_items) + items, train_keys)
    missed = np.asarray([o.size for o in own], dtype=np.int64) - np.bincount(owner, truth, minlength=n).astype(np.int64)
    return ptr, truth, missed


def _reconstruction_result(name: str, ptr: np.ndarray, scores: np.ndarray, truth: np.ndarray, missed: np.ndarray, n_pos: np.ndarray, details: dict[str, Any]) -> AttackResult:
    """Count and sign decisions from row scores, their set metrics, and the AUC among uploaded rows."""
    sign = reconstruction_metrics(ptr, decide_by_sign(scores), truth, missed)
    count = reconstruction_metrics(ptr, decide_by_count(ptr, scores, n_pos), truth, missed)
    true_pos = np.bincount(np.repeat(np.arange(ptr.size - 1), np.diff(ptr)), truth, minlength=ptr.size - 1) + missed
    metrics = {**{k: float(v) for k, v in sign.items()}, **{f"count_{k}": float(v) for k, v in count.items() if k != "clients"}}
    metrics["count_estimate_exact"] = float(np.mean(n_pos == true_pos)) if n_pos.size else 0.0
    metrics["rows"] = float(truth.size)
    if truth.any() and not truth.all():
        metrics.update({f"uploaded_{k}": v for k, v in scalar_metrics(attack_metrics(truth.astype(np.int8), scores)).items()})
        metrics["auc"] = metrics["uploaded_auc"]  # the table's AUC column: among uploaded rows
    return AttackResult(name=name, observer="server", metrics=metrics, n_targets=int(truth.size), details={**details, "roc": (truth.astype(np.int8), scores)})


def reconstruction_results(
    per_client: dict[str, Any] | None,
    broadcast: dict[str, Any],
    split: Any,
    clients: np.ndarray,
    *,
    num_negatives: int,
    note: dict[str, Any],
) -> list[AttackResult]:
    """Exact reconstruction of every client's training set from its uploaded rows (:mod:`attacks.reconstruction`).

    ``interaction-reconstruction``: the direction attack (``dot`` scorer) or the fixed
    projection on ``W1i^T w2`` (``mlp``), rows scored above 0 taken as positives;
    ``count_*`` metrics keep instead each client's top rows, as many as its row total
    implies (``count_estimate_exact``: fraction of clients whose count is right); ``auc``
    is the score's AUC among uploaded rows. ``interaction-uploaded``: whether a row was
    uploaded at all, as a score on :func:`interaction_targets` pairs (the baseline every
    per-row score starts from). Without per-client data (secure backends) the server has
    no per-client rows: one result with nothing recovered.
    """
    if per_client is None:
        nothing = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "exact_recovery": 0.0, "clients": 0.0}
        return [AttackResult(name="interaction-reconstruction", observer="server", metrics=nothing, n_targets=0, details={**note, "source": "released sums only: no per-client rows"})]
    ptr, truth, missed = _uploaded_truth(per_client, split, clients)
    delta = per_client["item_delta"].double().numpy()
    d = int(broadcast["latent_dim"])
    _, w1i, _, w2, _ = (t[0] for t in unflatten_heads(broadcast["head"].unsqueeze(0), d))
    if not bool(w1i.any()):
        scores = dot_imia_row_scores(ptr, delta, pos_fraction=1.0 / (1 + num_negatives))
        method = "dot scorer: each client's dominant row direction (power iteration), sign by class balance"
    else:
        scores = fixed_direction_row_scores(delta, w1i.double().numpy(), w2.double().numpy())
        method = "mlp scorer: projection on the broadcast W1_item^T w2"
    n_pos = positives_from_row_count(np.diff(ptr), num_negatives, split.n_items)
    return [_reconstruction_result("interaction-reconstruction", ptr, scores, truth, missed, n_pos, {**note, "source": "each client's upload", "method": method})]


def run_view_attacks(
    views_dir: str | Path,
    round_idx: int,
    data: Any,
    split: Any,
    *,
    seed: int = 0,
    labelled_fraction: float = 0.5,
    imia_clients: int = 100,
    num_negatives: int = 4,
) -> list[AttackResult]:
    """Run every view-based attack on one recorded round; returns one result per attack and observer."""
    server = load_view(views_dir, round_idx, "server")
    outsider = load_view(views_dir, round_idx, "outsider")
    n_items = split.n_items
    received = server["received"]
    truth = server["truth"]
    clients = np.asarray(truth["clients"])
    results: list[AttackResult] = []
    pos, items, y = interaction_targets(split, clients, seed)
    per_client = received.get("per_client")
    label_note = {"backend": server["backend"], "exposure": server["exposure"]}

    # ---- interaction inference (server)
    if per_client is not None:
        norms = client_row_norms(per_client, n_items, received.get("noise_shares"))
        results.append(_result("interaction-magnitude", "server", y, norms[pos, items], {**label_note, "source": "each client's upload"}))
        if received.get("upload_format", "sparse") == "sparse" and imia_clients > 0:
            rng = np.random.default_rng(seed)
            chosen = np.sort(rng.choice(clients.size, size=min(imia_clients, clients.size), replace=False))
            sc = _imia(per_client, received["broadcast"], n_items, chosen, seed, 1.0 / (1 + num_negatives))
            keep = np.isin(pos, chosen)
            row_of = np.searchsorted(chosen, pos[keep])
            s = sc[row_of, items[keep]]
            s = np.where(np.isfinite(s), s, np.nanmin(s[np.isfinite(s)]) - 1.0 if np.isfinite(s).any() else 0.0)
            results.append(_result("interaction-imia", "server", y[keep], s, {**label_note, "clients": int(chosen.size)}))
            # the harder question the IMIA paper asks: among the rows a client uploaded
            # (its items and its sampled negatives), which are its items?
            ptr = np.asarray(per_client["row_ptr"])
            up_pos = np.concatenate([np.full(int(ptr[j + 1] - ptr[j]), k) for k, j in enumerate(chosen)])
            up_items = np.concatenate([np.asarray(per_client["row_items"][ptr[j] : ptr[j + 1]]) for j in chosen])
            up_y = np.concatenate([np.isin(per_client["row_items"][ptr[j] : ptr[j + 1]], split.train_of(int(clients[j]))) for j in chosen]).astype(np.int8)
            note = {**label_note, "clients": int(chosen.size), "source": "uploaded rows only"}
            results.append(_result("interaction-imia-uploaded", "server", up_y, sc[up_pos, up_items], note))
            results.append(_result("interaction-magnitude-uploaded", "server", up_y, norms[chosen[up_pos], up_items], note))
            if bool(unflatten_heads(received["broadcast"]["head"].unsqueeze(0), int(received["broadcast"]["latent_dim"]))[1].any()):
                # mlp scorer: IMIA's scores turned into a set, beside the fixed projection
                sub_ptr = np.concatenate([[0], np.cumsum(ptr[chosen + 1] - ptr[chosen])]).astype(np.int64)
                sub_truth = up_y.astype(bool)
                missed = np.asarray([split.train_of(int(clients[j])).size for j in chosen]) - np.bincount(up_pos, sub_truth, minlength=chosen.size).astype(np.int64)
                n_pos = positives_from_row_count(np.diff(sub_ptr), num_negatives, n_items)
                results.append(_reconstruction_result("interaction-reconstruction-imia", sub_ptr, sc[up_pos, up_items], sub_truth, missed, n_pos, {**note, "method": "IMIA-style fitted user embedding"}))
        if received.get("upload_format", "sparse") == "sparse":
            results += reconstruction_results(per_client, received["broadcast"], split, clients, num_negatives=num_negatives, note=label_note)
            uploaded = np.zeros((clients.size, n_items), dtype=np.float64)
            ptr_all = np.asarray(per_client["row_ptr"])
            uploaded[np.repeat(np.arange(clients.size), np.diff(ptr_all)), np.asarray(per_client["row_items"])] = 1.0
            results.append(_result("interaction-uploaded", "server", y, uploaded[pos, items], {**label_note, "source": "whether the row was uploaded at all (baseline)"}))
            results[-2] = dataclasses.replace(results[-2], metrics={**results[-2].metrics, "uploaded_indicator_auc": results[-1].metrics["auc"]})
    else:
        row = received["item_sum"].norm(dim=1).numpy()
        results.append(_result("interaction-magnitude", "server", y, row[items], {**label_note, "source": "released sum (no per-client data)"}))
        results += reconstruction_results(None, received["broadcast"], split, clients, num_negatives=num_negatives, note=label_note)

    # ---- attribute inference (server)
    attrs = getattr(data, "user_attributes", None)
    if attrs is not None and "gender" in attrs and "age" in attrs:
        gender = (attrs["gender"].to_numpy()[clients] == "F").astype(np.int64)
        age = age_bracket(attrs["age"].to_numpy()[clients])
        if per_client is not None:
            # the item-row norms of the upload; adding the (8k-dim, noisy) head update made the
            # classifier worse on ML-100K (gender AUC 0.60 against 0.63 with row norms alone)
            feats = norms
            source = "each client's upload (item-row norms)"
        else:
            feats = np.zeros((clients.size, 1), dtype=np.float32)
            source = "none per client (sums only)"
        raw = np.zeros((clients.size, n_items), dtype=np.float32)
        for j, u in enumerate(clients):
            raw[j, split.train_of(int(u))] = 1.0
        for attr, labels in (("gender", gender), ("age", age)):
            res = attribute_inference(feats, labels, labelled_fraction=labelled_fraction, seed=seed)
            upper = attribute_inference(raw, labels, labelled_fraction=labelled_fraction, seed=seed)
            ovr = one_vs_rest_metrics(labels[res["test_index"]], np.asarray(res["proba"]), np.asarray(res["classes"]))
            metrics = {**res, **{k: v for k, v in ovr.items() if k != "auc_ovr"}, "upper_bound_raw_interactions": {k: upper[k] for k in ("auc", "accuracy") if k in upper}}
            results.append(
                AttackResult(name=f"attribute-{attr}", observer="server", metrics=scalar_metrics(metrics), n_targets=int(clients.size), details={**label_note, "source": source})
            )

    # ---- group inference (server and outsider)
    true_groups = truth.get("groups")
    teacher = outsider["released"].get("teacher")
    if true_groups is not None and teacher is not None:
        indptr = np.concatenate([[0], np.cumsum([split.train_of(int(u)).size for u in clients])])
        user_items = np.concatenate([split.train_of(int(u)) for u in clients])
        # standardise each group's preferences over items: groups differ in overall level
        # (an empty group keeps 0.5 everywhere), which says nothing about membership
        t = teacher.double()
        z = ((t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True).clamp(min=1e-12)).numpy()
        raw_inferred = group_inference(z, (indptr, user_items), np.asarray(true_groups))
        ovr = one_vs_rest_metrics(np.asarray(true_groups), np.asarray(raw_inferred["scores"], dtype=np.float64), np.arange(z.shape[0]))
        inferred = {**scalar_metrics(raw_inferred), "auc": ovr["auc_ovr"], "tpr_at_fpr_0.01": ovr["tpr_at_fpr_0.01"], "tpr_at_fpr_0.001": ovr["tpr_at_fpr_0.001"]}
        results.append(
            AttackResult(name="group-membership", observer="outsider", metrics=inferred, n_targets=int(clients.size), details={"source": "released group preferences + the user's items"})
        )
        server_knows = per_client is not None and server["meta"].get("grouping") in ("spectral", "kmeans")
        results.append(
            AttackResult(
                name="group-membership", observer="server",
                metrics=(
                    {"accuracy": 1.0, "auc": 1.0, "tpr_at_fpr_0.01": 1.0, "tpr_at_fpr_0.001": 1.0, "baseline_accuracy": 1.0 / max(teacher.shape[0], 1)}
                    if server_knows
                    else inferred
                ),
                n_targets=int(clients.size),
                details={"source": "the server assigned the groups" if server_knows else "released group preferences + the user's items"},
            )
        )
    return results
