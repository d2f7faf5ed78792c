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
- **attribute inference** (:func:`attribute_results`): gender, age >= 30 and the age
  bracket (4 classes) from a user x item matrix built from what the adversary saw: under
  ``plain`` with sparse uploads, each client's training set as the server reconstructs it
  (``from-reconstruction``, chained onto ``interaction-reconstruction``) and the set of
  rows it uploaded (``from-uploaded-rows``, training items plus sampled negatives); with
  dense uploads, the norms of the uploaded rows (``from-row-norms``). A logistic
  regression whose C and feature transform are tuned by nested cross-validation
  (:func:`attacks.attribute.cv_attribute_inference`); the AUC is the mean and std over 5
  stratified outer folds, the adversary knowing the labels of the other folds' users. Each
  figure comes with its **ceiling**: the same estimator on the users' true training
  interactions (same folds). Secure backends leave the server no per-client feature, and
  the released outputs carry no per-user quantity: both are stated, not scored.
- **group membership** (:func:`group_results`): ``group-membership-known`` where the
  server's view carries each client's group (under ``plain``: the group field of an
  oblivious client's upload, or the server's own clustering of the uploaded heads,
  re-derived here from the view), reported as a match rate, not an attack AUC;
  ``group-membership-from-teacher``: a party that sees the broadcast group preference
  scores (the teacher) and a target's training items names the group whose preferences
  are highest on average over those items. Round 0 of oblivious grouping is a random
  partition drawn before any data: that is stated instead of a chance-level AUC.

The auxiliary knowledge granted: the adversary knows each target user's training items
for the teacher attack (an outsider who knows a user's history), and the attribute of
the training folds' users for attribute inference.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from attacks.attribute import DEFAULT_CS, attribute_targets, cv_attribute_inference, interaction_matrix, min_class_size
from attacks.base import AttackResult
from attacks.grouping import group_inference, partition_match
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

__all__ = [
    "ATTRIBUTE_VIEWS",
    "attribute_results",
    "client_row_norms",
    "group_results",
    "interaction_targets",
    "reconstructed_interactions",
    "reconstruction_results",
    "run_view_attacks",
]


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


def _reconstruction_row_scores(per_client: dict[str, Any], broadcast: dict[str, Any], num_negatives: int) -> tuple[np.ndarray, str]:
    """float64 [R] signed score of every uploaded row (positive: a training item) and the method used.

    ``dot`` scorer: each client's dominant row direction (power iteration), sign by the
    class balance; ``mlp`` scorer: projection on the broadcast ``W1_item^T w2``.
    """
    ptr = np.asarray(per_client["row_ptr"], dtype=np.int64)
    delta = per_client["item_delta"].double().numpy()
    d = int(broadcast["latent_dim"])
    _, w1i, _, w2, _ = (t[0] for t in unflatten_heads(broadcast["head"].unsqueeze(0), d))
    if not bool(w1i.any()):
        scores = dot_imia_row_scores(ptr, delta, pos_fraction=1.0 / (1 + num_negatives))
        return scores, "dot scorer: each client's dominant row direction (power iteration), sign by class balance"
    scores = fixed_direction_row_scores(delta, w1i.double().numpy(), w2.double().numpy())
    return scores, "mlp scorer: projection on the broadcast W1_item^T w2"


def reconstructed_interactions(per_client: dict[str, Any], broadcast: dict[str, Any], num_negatives: int) -> tuple[np.ndarray, np.ndarray]:
    """Each client's training set as the server reconstructs it from its sparse upload.

    The rows of ``interaction-reconstruction`` scored above 0 (the sign decision), i.e.
    what the server concludes from the upload and the broadcast model alone.

    Returns
    -------
    indptr : int64 [n + 1] (clients in upload order); items : int64 [nnz] reconstructed
    training items, ``items[indptr[j]:indptr[j + 1]]`` for client ``j``.
    """
    ptr = np.asarray(per_client["row_ptr"], dtype=np.int64)
    scores, _ = _reconstruction_row_scores(per_client, broadcast, num_negatives)
    keep = decide_by_sign(scores)
    owner = np.repeat(np.arange(ptr.size - 1), np.diff(ptr))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(owner[keep], minlength=ptr.size - 1))]).astype(np.int64)
    return indptr, np.asarray(per_client["row_items"], dtype=np.int64)[keep]


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
    scores, method = _reconstruction_row_scores(per_client, broadcast, num_negatives)
    n_pos = positives_from_row_count(np.diff(ptr), num_negatives, split.n_items)
    return [_reconstruction_result("interaction-reconstruction", ptr, scores, truth, missed, n_pos, {**note, "source": "each client's upload", "method": method})]


#: Attribute-inference views: name -> what the feature matrix [clients, items] holds.
ATTRIBUTE_VIEWS: dict[str, str] = {
    "reconstruction": (
        "each client's training set as the server reconstructs it from its upload "
        "(interaction-reconstruction, rows scored above 0), binary"
    ),
    "uploaded-rows": "the item rows each client uploaded (its training items and its sampled negatives), binary",
    "row-norms": "the L2 norm of each item-table row of the client's upload (its noise share included)",
}

#: What the ceiling of every attribute figure is computed on.
CEILING_SOURCE = "the users' true training interactions, binary (an adversary that knew every interaction; not a view)"

_TARGET_TEXT = {
    "gender": "gender (1 = F)",
    "age-ge-30": "age >= 30",
    "age-bracket4": "age bracket <25 / 25-34 / 35-44 / 45+",
}

_AUC_TEXT = {
    "auc": "ROC AUC of the positive class",
    "auc_macro_ovr": "macro one-vs-rest AUC: the mean over the 4 brackets of each bracket's AUC against the rest",
    "auc_micro_ovr": "micro one-vs-rest AUC: one AUC over every (user, bracket) pair, scored by the bracket's probability",
}


def _statement(name: str, observer: str, text: str, **details: Any) -> AttackResult:
    """A result with no figure: what the view allows, stated (``details['kind'] = 'statement'``)."""
    return AttackResult(name=name, observer=observer, metrics={}, n_targets=0, details={**details, "kind": "statement", "statement": text})


def _fingerprint(x: np.ndarray | sp.spmatrix) -> str:
    """Digest of a feature matrix's values (two equal matrices stored alike share one cross-validation)."""
    h = hashlib.sha256()
    if sp.issparse(x):
        m = sp.csr_matrix(x)
        m.sort_indices()
        parts = [np.asarray(m.shape, np.int64), m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data.astype(np.float64)]
    else:
        parts = [np.asarray(x.shape, np.int64), np.asarray(x, dtype=np.float64)]
    for a in parts:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _too_small(labels: np.ndarray, outer_folds: int, inner_folds: int) -> str | None:
    """Why nested CV cannot run on ``labels`` (a class too small), or None."""
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size < 2:
        return f"a single class among these clients ({classes.tolist()})"
    need = min_class_size(outer_folds, inner_folds)
    if counts.min() < need:
        return f"class {classes[np.argmin(counts)]} has {counts.min()} client(s); nested {outer_folds} x {inner_folds}-fold CV needs >= {need}"
    return None


def _attribute_metrics(key: str, res: dict[str, Any], ceil: dict[str, Any], labels: np.ndarray) -> dict[str, float]:
    """The figures of one (view, target, AUC definition): the view's, its ceiling's and the share of the lift reached."""
    m: dict[str, float] = {
        "auc": res[key], "auc_std": res[f"{key}_std"],
        "ceiling_auc": ceil[key], "ceiling_auc_std": ceil[f"{key}_std"],
        "share_of_ceiling_lift": (res[key] - 0.5) / (ceil[key] - 0.5) if ceil[key] > 0.5 else float("nan"),
        "accuracy": res["accuracy"], "accuracy_std": res["accuracy_std"], "ceiling_accuracy": ceil["accuracy"],
        "baseline_accuracy": res["baseline_accuracy"], "baseline_auc": 0.5,
        "folds": float(res["outer_folds"]), "inner_folds": float(res["inner_folds"]),
    }
    for other in ("auc_macro_ovr", "auc_micro_ovr"):
        if other in res:
            m[other], m[f"{other}_std"], m[f"ceiling_{other}"] = res[other], res[f"{other}_std"], ceil[other]
    classes = np.asarray(res["classes"])
    if key == "auc":
        pooled = attack_metrics((labels == classes[1]).astype(np.int8), res["oof_proba"][:, 1])
    elif key == "auc_micro_ovr":
        pooled = attack_metrics((labels[:, None] == classes[None, :]).astype(np.int8).ravel(), res["oof_proba"].ravel())
    else:
        return m  # TPR at low FPR is a pooled, micro quantity: not given beside a macro AUC
    m.update({k: pooled[k] for k in ("tpr_at_fpr_0.01", "tpr_at_fpr_0.001")})
    return m


def attribute_results(
    views: Mapping[str, np.ndarray | sp.spmatrix],
    ceiling: sp.spmatrix,
    targets: Mapping[str, np.ndarray],
    *,
    observer: str = "server",
    seed: int = 0,
    outer_folds: int = 5,
    inner_folds: int = 3,
    cs: Sequence[float] = DEFAULT_CS,
    note: Mapping[str, Any] | None = None,
) -> list[AttackResult]:
    """Attribute inference from each view beside its ceiling, by nested cross-validation.

    Parameters
    ----------
    views : view name (a key of :data:`ATTRIBUTE_VIEWS`) -> feature matrix [n, F] of the
        n attacked clients, dense or sparse.
    ceiling : [n, I] the clients' true training interactions, binary.
    targets : target name (see :func:`attacks.attribute.attribute_targets`) -> int labels [n].
    observer : the adversary holding the views.
    seed : fold shuffling; view and ceiling use the same folds.
    outer_folds, inner_folds, cs : see :func:`attacks.attribute.cv_attribute_inference`.
    note : merged into every result's details.

    Returns
    -------
    Per binary target and view one result ``attribute-{target}-from-{view}``; per
    multi-class target two, ``attribute-{target}-macro-from-{view}`` and
    ``...-micro-from-{view}``, whose ``auc`` is the macro and the micro one-vs-rest AUC.
    Metrics: ``auc`` / ``auc_std`` (mean and std over the outer folds),
    ``ceiling_auc`` / ``ceiling_auc_std``, ``share_of_ceiling_lift``
    (``(auc - 0.5) / (ceiling_auc - 0.5)``), accuracy against the majority baseline,
    and TPR at 1% / 0.1% FPR of the pooled out-of-fold scores (binary and micro only).
    A target whose smallest class is too small for the folds gives one statement.
    """
    note = dict(note or {})
    cache: dict[tuple[str, str], dict[str, Any]] = {}

    def cv(x: np.ndarray | sp.spmatrix, tname: str, labels: np.ndarray) -> dict[str, Any]:
        key = (_fingerprint(x), tname)
        if key not in cache:  # a view equal to another (an exact reconstruction and the truth) is fitted once
            cache[key] = cv_attribute_inference(x, labels, seed=seed, outer_folds=outer_folds, inner_folds=inner_folds, cs=cs)
        return cache[key]

    out: list[AttackResult] = []
    protocol = (
        f"logistic regression, C and feature transform (raw / l2-rows / tfidf) chosen by {inner_folds}-fold stratified CV "
        f"inside each of {outer_folds} stratified outer folds; the adversary knows the attribute of the other folds' clients"
    )
    same_as_ceiling = {vname: _fingerprint(x) == _fingerprint(ceiling) for vname, x in views.items()}
    # entries in which a sparse view differs from the true matrix (dense views: not comparable)
    differing = {vname: int((sp.csr_matrix(x) != sp.csr_matrix(ceiling)).nnz) for vname, x in views.items() if sp.issparse(x) and x.shape == ceiling.shape}
    for tname, labels in targets.items():
        y = np.asarray(labels, dtype=np.int64)
        why = _too_small(y, outer_folds, inner_folds)
        if why is not None:
            out.append(_statement(f"attribute-{tname}", observer, f"not run: {why}", **note))
            continue
        ceil = cv(ceiling, tname, y)
        for vname, x in views.items():
            res = cv(x, tname, y)
            keys = [("auc", "")] if "auc" in res else [("auc_macro_ovr", "-macro"), ("auc_micro_ovr", "-micro")]
            for key, suffix in keys:
                details: dict[str, Any] = {
                    **note, "kind": "attribute", "target": _TARGET_TEXT.get(tname, tname), "view": vname,
                    "source": ATTRIBUTE_VIEWS.get(vname, vname), "ceiling_source": CEILING_SOURCE,
                    "auc_definition": _AUC_TEXT[key], "protocol": protocol, "same_features_as_ceiling": same_as_ceiling[vname],
                    "entries_differing_from_ceiling": differing.get(vname),
                    "chosen_c": [float(c) for c in res["chosen_c"]], "chosen_transform": list(res["chosen_transform"]),
                    "ceiling_chosen_c": [float(c) for c in ceil["chosen_c"]], "ceiling_chosen_transform": list(ceil["chosen_transform"]),
                    f"fold_{key}": [float(v) for v in res[f"fold_{key}"]], f"ceiling_fold_{key}": [float(v) for v in ceil[f"fold_{key}"]],
                }
                classes = np.asarray(res["classes"])
                if key == "auc":
                    details["roc"] = ((y == classes[1]).astype(np.int8), res["oof_proba"][:, 1])
                out.append(AttackResult(
                    name=f"attribute-{tname}{suffix}-from-{vname}", observer=observer,
                    metrics=_attribute_metrics(key, res, ceil, y), n_targets=int(y.size), details=details,
                ))
    return out


def group_results(
    server: dict[str, Any],
    outsider: dict[str, Any],
    split: Any,
    *,
    grouping_options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> list[AttackResult]:
    """Group membership: known from the view where it carries it, else inferred from the teacher.

    Parameters
    ----------
    server, outsider : the round's loaded views (:func:`gfmfr_secure.simulation.views.load_view`).
    split : the run's split (the targets' true training items: the auxiliary knowledge
        of the teacher attack).
    grouping_options : the run's ``use_pca``, ``pca_variance`` and ``seed`` (its root
        seed), used to re-derive a server-side clustering from the view; without them
        the library defaults and ``seed`` are used (the partition, compared after
        relabelling, does not depend on the seed when the clustering is stable).
    seed : see ``grouping_options``.

    Returns
    -------
    ``group-membership-known`` (server; metrics of
    :func:`attacks.grouping.partition_match`) where the server's view carries each
    client's group; ``group-membership-from-teacher`` (outsider, and the server when it
    does not know the groups: AUC of the one-vs-rest scores pooled over (client, group)
    pairs, accuracy against the most frequent group); statements (no figure) where no
    group exists, or where the round's groups are a random partition (round 0 of
    oblivious grouping).
    """
    meta = server["meta"]
    round_idx = int(server["round"])
    n_groups = int(meta.get("n_groups") or 0)
    grouping = meta.get("grouping")
    truth = server["truth"]
    true_groups = truth.get("groups")
    clients = np.asarray(truth["clients"])
    if n_groups == 0 or true_groups is None:
        text = "no groups in this run (n_groups = 0): no group membership to infer"
        return [_statement("group-membership", o, text) for o in ("server", "outsider")]
    true_groups = np.asarray(true_groups, dtype=np.int64)
    if n_groups == 1:
        text = "a single group: every client is in it"
        return [_statement("group-membership", o, text) for o in ("server", "outsider")]
    out: list[AttackResult] = []

    # ---- what the server's view carries
    per_client = server["received"].get("per_client")
    counts = server["received"].get("group_counts")
    found: np.ndarray | None = None
    how = ""
    if per_client is not None:
        uploaded = np.asarray(per_client.get("group", np.full(clients.size, -1)), dtype=np.int64)
        if grouping in ("oblivious", "none") and uploaded.size == clients.size and (uploaded >= 0).all():
            found, how = uploaded, f"the group field of each client's upload (grouping.method={grouping}: the client picks its group and sends it)"
        elif grouping in ("spectral", "kmeans") and per_client.get("head_after") is not None:
            # (the upload's group field is then the client's group of the previous round, not this one's)
            from gfmfr_secure.rng import derive_seed
            from gfmfr_secure.server.grouping import group_clients

            opts = dict(grouping_options or {})
            run_seed = int(opts.get("seed", seed))
            found = group_clients(
                per_client["head_after"].numpy(), clients, None, method=grouping, n_groups=n_groups,
                use_pca=bool(opts.get("use_pca", True)), pca_variance=float(opts.get("pca_variance", 0.95)),
                seed=derive_seed(run_seed, "grouping", round_idx) % (2**31),
            )
            how = (
                f"the server clusters the uploaded heads itself (grouping.method={grouping}); re-clustered here from the "
                f"view's head_after with {'the run' if 'seed' in opts else 'an assumed'} seed; group names compared after relabelling"
            )
    if found is None and counts is not None:
        occupied = np.flatnonzero(np.asarray(counts, dtype=np.float64) >= 0.5)
        if occupied.size == 1:
            found = np.full(clients.size, int(occupied[0]), dtype=np.int64)
            how = "the group counts released to the server: a single non-empty group this round, so every client is in it"
    known = found is not None
    if found is not None:
        m = partition_match(found, true_groups)
        out.append(AttackResult(
            name="group-membership-known", observer="server", metrics={**m, "n_groups": float(n_groups)}, n_targets=int(clients.size),
            details={"kind": "known", "source": how, "statement": (
                f"known, not inferred: the server's view gives each client's group "
                f"({int(m['n_matched'])} of {int(m['n_users'])} clients match after relabelling)"
            )},
        ))

    # ---- the teacher attack
    observers = ["outsider"] if known else ["outsider", "server"]
    teacher = outsider["released"].get("teacher")
    if grouping == "oblivious" and round_idx == 0:
        text = (
            "round 0 of oblivious grouping: the groups are a random partition drawn before any data, so every attack "
            "on membership is at chance by construction (not reported as a finding); attack a round >= 1"
        )
        return out + [_statement("group-membership-from-teacher", o, text) for o in observers]
    if teacher is None:
        return out + [_statement("group-membership-from-teacher", o, "no group preferences released this round") for o in observers]
    indptr = np.concatenate([[0], np.cumsum([split.train_of(int(u)).size for u in clients])])
    user_items = np.concatenate([split.train_of(int(u)) for u in clients])
    # standardise each group's preferences over items: groups differ in overall level
    # (an empty group keeps 0.5 everywhere), which says nothing about membership
    t = teacher.double()
    z = ((t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True).clamp(min=1e-12)).numpy()
    raw = group_inference(z, (indptr, user_items), true_groups)
    ovr = one_vs_rest_metrics(true_groups, np.asarray(raw["scores"], dtype=np.float64), np.arange(z.shape[0]))
    metrics = {**scalar_metrics(raw), "auc": ovr["auc_ovr"], "tpr_at_fpr_0.01": ovr["tpr_at_fpr_0.01"], "tpr_at_fpr_0.001": ovr["tpr_at_fpr_0.001"]}
    occupied = int(np.unique(true_groups).size)
    source = "broadcast group preferences (teacher) + the target's true training items; nearest group by mean standardised preference"
    if occupied == 1:
        source += "; a single group is occupied this round, so always guessing it is right (the baseline)"
    details = {
        "kind": "attack", "source": source, "occupied_groups": occupied,
        "auc_definition": "one-vs-rest AUC pooled over every (client, group) pair",
    }
    for o in observers:
        out.append(AttackResult(name="group-membership-from-teacher", observer=o, metrics=metrics, n_targets=int(clients.size), details=details))
    return out


def run_view_attacks(
    views_dir: str | Path,
    round_idx: int,
    data: Any,
    split: Any,
    *,
    seed: int = 0,
    imia_clients: int = 100,
    num_negatives: int = 4,
    attribute_folds: int = 5,
    grouping_options: Mapping[str, Any] | None = None,
) -> list[AttackResult]:
    """Run every view-based attack on one recorded round; returns one result per attack and observer.

    ``attribute_folds``: outer folds of the attribute inference (0 = skip it);
    ``grouping_options``: see :func:`group_results`.
    """
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

    # ---- attribute inference (server; the outsider's view holds nothing per user)
    attrs = getattr(data, "user_attributes", None)
    if attribute_folds and attrs is not None and "gender" in attrs and "age" in attrs:
        targets = attribute_targets(attrs["gender"].to_numpy()[clients], attrs["age"].to_numpy()[clients])
        own = [split.train_of(int(u)) for u in clients]
        ceiling = interaction_matrix(np.concatenate([[0], np.cumsum([o.size for o in own])]), np.concatenate(own), n_items)
        views: dict[str, Any] = {}
        if per_client is not None and received.get("upload_format", "sparse") == "sparse":
            views["reconstruction"] = interaction_matrix(*reconstructed_interactions(per_client, received["broadcast"], num_negatives), n_items)
            views["uploaded-rows"] = interaction_matrix(np.asarray(per_client["row_ptr"]), np.asarray(per_client["row_items"]), n_items)
        elif per_client is not None:
            views["row-norms"] = norms
        if views:
            results += attribute_results(views, ceiling, targets, seed=seed, outer_folds=attribute_folds, note=label_note)
        else:
            results.append(_statement("attribute-inference", "server", "not run: the server received sums only, no per-client feature to attack", **label_note))
        results.append(_statement(
            "attribute-inference", "outsider",
            "not run: the released outputs (global model, group preferences) hold no per-user quantity; an outsider who knows "
            "a user's items has the ceiling figure (true interactions) without any view",
        ))

    # ---- group membership (server and outsider)
    results += group_results(server, outsider, split, grouping_options=grouping_options, seed=seed)
    return results
