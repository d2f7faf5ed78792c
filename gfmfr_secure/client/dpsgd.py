"""Record-level DP-SGD inside each client, through Opacus (an opt-in, slow path).

A client trains the same model, with the same loss terms and the same parameters as
:func:`gfmfr_secure.client.local.train_client`, but every optimizer step is an Opacus
DP-SGD step: per-example gradients are clipped to L2 norm ``max_grad_norm`` jointly
over *all* trained parameters (flat clipping), summed, perturbed with Gaussian noise
of std ``noise_multiplier * max_grad_norm`` and divided by the expected batch size;
batches are drawn by Poisson sampling (each example independently, at rate ``q``).

The model and its per-example loss are :class:`~gfmfr_secure.models.recommender.Recommender`'s
(either scorer), built by :func:`gfmfr_secure.client.local.client_model` over the
client's local item rows; its parameters live in ``nn.Embedding`` and ``nn.Linear``
layers, whose per-example gradients Opacus computes. Every term of the loss depends on
example ``j`` alone, so Opacus's per-example gradients are exact. They are materialised
densely (``[B, R, d]`` per embedding table and step), which makes this path one to two
orders of magnitude slower than ``train_client``. Weight decay (of the head and user
embedding under ``mlp``, of the user vector under ``dot``) is applied by the wrapped
``torch.optim.SGD`` after clipping and noise; it does not touch the data.

Distillation weight. The reference trainer keeps a running ratio of base to KL loss
(``store.ema_ratio``) updated from every batch's losses. Under DP-SGD that ratio would
be a data-dependent quantity outside the privacy accounting, so it is **not updated**
here: the weight is fixed for the round at ``lambda = hyper.distill * ema`` with
``ema`` the client's current ``store.ema_ratio`` (``1`` while it is NaN), and
``store.ema_ratio`` is left unchanged.

Privacy guarantee and its scope
-------------------------------
Unit of privacy: one interaction record ``(user, item, label)`` of the client's
training set for the round (the ``items`` / ``labels`` passed in); neighbouring
relation: add or remove one record. This is **record-level (example) DP within one
client's local data, not user-level DP**: a user's whole history is many records.

* Covered: the trained values that leave or stay on the client (``item_delta``,
  ``head_delta``, ``head_after`` and the private state written back to the store), as
  post-processing of the DP-SGD trajectory. Across rounds the per-round guarantees
  compose; :func:`compose_client_epsilon` does that.
* Not covered: ``n_samples`` and the sample rate derived from it (treated as public;
  they are uploaded anyway), the loss diagnostic in ``CohortUpdate.loss`` (computed
  from raw batch losses), and the *row layout*: by default the uploaded rows are the
  items of the client's samples, which reveals which items it trained on. Pass
  ``rows`` (e.g. ``np.arange(n_items)``, or any set chosen without looking at the
  data) to make the uploaded row set data-independent; untouched rows then carry pure
  noise. How negatives are drawn from the positives is also outside the guarantee.
* The noise comes from a seeded ``torch.Generator`` (Opacus ``secure_mode`` off): right
  for reproducible simulation, not hardened against floating-point attacks.

Sampling and steps follow Opacus's rule for a loader of batch size ``B`` over ``n``
examples: ``q = 1 / ceil(n / B)``, ``ceil(n / B)`` steps per epoch, gradients divided by
``int(n q)``. The reported epsilon comes from the engine's own Opacus accountant, which
records one ``(sigma, q)`` entry per optimizer step (empty Poisson batches included);
its history is evaluated with :func:`gfmfr_secure.privacy.accounting.epsilon_for` (cached).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gfmfr_secure.client.cohort import cohort_samples
from gfmfr_secure.client.local import client_model, client_sgd, client_update
from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.models.backbones import BackboneSpec
from gfmfr_secure.models.params import SharedParams
from gfmfr_secure.models.recommender import RecBatch, Recommender
from gfmfr_secure.privacy.accounting import PrivacyEvent, PrivacyLedger, _check_delta, epsilon_for
from gfmfr_secure.privacy.accounting import _check_noise_multiplier as _check_sigma
from gfmfr_secure.rng import torch_generator
from gfmfr_secure.types import CohortUpdate, LocalHyper

__all__ = [
    "DPSGD_ACCOUNTANTS",
    "RECORD_LEVEL_UNIT",
    "DPSGDReport",
    "compose_client_epsilon",
    "train_client_dpsgd",
    "train_cohort_dpsgd",
]

#: Accountants an Opacus ``PrivacyEngine`` and the project's accounting both know.
DPSGD_ACCOUNTANTS = ("rdp", "prv")

#: What the epsilon of a :class:`DPSGDReport` protects.
RECORD_LEVEL_UNIT = "record-level (example) DP within one client's local data; not user-level"


@dataclass(frozen=True)
class DPSGDReport:
    """Privacy facts of one client's DP-SGD round.

    Attributes
    ----------
    client : user id.
    n_samples : training records of the round (the dataset the guarantee is about).
    expected_batch_size : ``int(n q)``, the divisor of the summed clipped gradients.
    sample_rate : Poisson sampling rate ``q`` of each step (0 when no step ran).
    steps : optimizer steps taken (= accountant entries), ``epochs * ceil(n / B)``.
    noise_multiplier : sigma; the noise std is ``sigma * max_grad_norm``.
    max_grad_norm : per-example clipping bound over all trained parameters.
    delta : the delta ``epsilon`` is stated for.
    epsilon : epsilon of this round alone for this client (``inf`` when sigma is 0), from the
        history of the engine's Opacus accountant.
    accountant : name of that accountant.
    distill_lambda : the fixed distillation weight used this round (0 = no distillation).
    batch_sizes : realised Poisson batch size of every step (a client-side diagnostic).
    unit : :data:`RECORD_LEVEL_UNIT`.
    """

    client: int
    n_samples: int
    expected_batch_size: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    epsilon: float
    accountant: str
    distill_lambda: float
    batch_sizes: tuple[int, ...]
    unit: str = RECORD_LEVEL_UNIT

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (``batch_sizes`` as a list)."""
        out = asdict(self)
        out["batch_sizes"] = list(self.batch_sizes)
        return out


# --------------------------------------------------------------------------- validation


def _check_clip(max_grad_norm: float) -> float:
    value = float(max_grad_norm)
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(f"max_grad_norm must be finite and > 0, got {max_grad_norm!r}")
    return value


def _check_accountant(accountant: str) -> str:
    if accountant not in DPSGD_ACCOUNTANTS:
        raise ConfigError(f"accountant: unknown name {accountant!r}; known: {', '.join(DPSGD_ACCOUNTANTS)}")
    return accountant


def _check_batch(expected_batch_size: int, n: int, client: int) -> int:
    if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, (int, np.integer)) or expected_batch_size < 1:
        raise ConfigError(f"expected_batch_size must be an integer >= 1, got {expected_batch_size!r}")
    if expected_batch_size > n:
        raise ConfigError(f"expected_batch_size={int(expected_batch_size)} is larger than client {client}'s {n} training samples")
    return int(expected_batch_size)


def _generators(seed: int | None, generator: torch.Generator | None, client: int) -> tuple[torch.Generator, torch.Generator]:
    """(sampling, noise) generators: two streams keyed by ``(seed, client)``, or the one passed."""
    if (seed is None) == (generator is None):
        raise ConfigError("pass exactly one of seed and generator")
    if generator is not None:
        return generator, generator
    return torch_generator(int(seed), "dpsgd", "sampling", client), torch_generator(int(seed), "dpsgd", "noise", client)


def _local_rows(items: np.ndarray, rows: np.ndarray | None, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Local item rows and each sample's row.

    Returns
    -------
    local_items : int64 [R] sorted item ids of the client's embedding tables.
    sample_row : int64 [m] row of each sample in ``local_items``.
    """
    if rows is None:
        local_items, inverse = np.unique(items, return_inverse=True)
        return local_items.astype(np.int64), inverse.reshape(-1).astype(np.int64)
    local_items = np.asarray(rows, dtype=np.int64).reshape(-1)
    if local_items.size and (np.any(np.diff(local_items) <= 0) or local_items[0] < 0 or local_items[-1] >= n_items):
        raise ConfigError(f"rows must be strictly increasing item ids in [0, {n_items})")
    pos = np.searchsorted(local_items, items)
    inside = pos < local_items.size
    if not (np.all(inside) and np.array_equal(local_items[pos], items)):
        raise ConfigError("rows must contain every item of the client's samples")
    return local_items, pos.astype(np.int64)


# --------------------------------------------------------------------------- model


class _PerExampleLoss(nn.Module):
    """Opacus's view of a client's model: ``forward`` returns the per-example losses.

    Parameters
    ----------
    model : the client's :class:`Recommender` (user slot 0).
    lam : the round's fixed distillation weight (0 = no KL term).
    """

    def __init__(self, model: Recommender, lam: float) -> None:
        super().__init__()
        self.model = model
        self.lam = float(lam)

    def forward(self, rows: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """float32 [B] per-example losses of local rows ``rows`` [B], labels ``y`` [B] and teacher ``q`` [B]."""
        batch = RecBatch(torch.zeros_like(rows), rows, y, q if self.lam else None)
        return self.model.per_example_loss(batch, self.lam)


# --------------------------------------------------------------------------- training


def _run_dpsgd(
    model: _PerExampleLoss,
    groups: list[dict[str, Any]],
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    batch_size: int,
    epochs: int,
    sigma: float,
    clip: float,
    accountant: str,
    gen_sampling: torch.Generator,
    gen_noise: torch.Generator,
) -> tuple[Any, float, int, list[int], list[float]]:
    """Train ``model`` with Opacus DP-SGD in place.

    Returns
    -------
    (engine accountant, sample rate, expected batch size, batch size per step, mean loss per non-empty step)
    """
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant=accountant)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=batch_size, generator=gen_sampling)
    dp_model, optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(groups),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        poisson_sampling=True,
        clipping="flat",
        noise_generator=gen_noise,
    )
    batch_sizes: list[int] = []
    losses: list[float] = []
    try:
        with warnings.catch_warnings():
            # Opacus's backward hooks on layers whose inputs need no gradient (the embeddings,
            # the first linear layers) make torch warn on every step; that is expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            for _ in range(epochs):
                for rows, y, q in dp_loader:
                    # An empty Poisson batch still takes a step: zero clipped sum plus noise,
                    # accounted for like any other (its mean loss is NaN and is not recorded).
                    optimizer.zero_grad(set_to_none=True)
                    loss = dp_model(rows, y, q).mean()
                    loss.backward()
                    optimizer.step()
                    if rows.numel():
                        losses.append(float(loss.item()))
                    batch_sizes.append(int(rows.numel()))
    finally:
        dp_model.cleanup()
    return engine.accountant, float(dp_loader.sample_rate), int(optimizer.expected_batch_size), batch_sizes, losses


@functools.lru_cache(maxsize=4096)
def _round_epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon of the engine accountant's single ``(sigma, q, steps)`` entry.

    A fresh Opacus accountant with the same history gives the same number (tested); the
    cache matters because an RDP evaluation at ``q < 1`` takes ~0.2 s and a cohort's
    clients share few distinct ``(q, steps)``.
    """
    return epsilon_for(sigma, q, steps, delta, accountant)


def train_client_dpsgd(
    shared: SharedParams,
    store: ClientStateStore,
    backbone: BackboneSpec,
    client: int,
    items: np.ndarray,
    labels: np.ndarray,
    hyper: LocalHyper,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    expected_batch_size: int | None = None,
    delta: float = 1e-5,
    accountant: str = "rdp",
    teacher_row: torch.Tensor | None = None,
    group: int = -1,
    rows: np.ndarray | None = None,
) -> tuple[CohortUpdate, DPSGDReport]:
    """Train one client for one round with record-level DP-SGD (Opacus).

    Parameters
    ----------
    shared : broadcast global parameters (not modified).
    store : client state; only this client's entries are read and written (``ema_ratio`` is
        read, not updated).
    backbone : which parameters exist and are shared.
    client : user id.
    items, labels : int64 [m], float32 [m] this round's records (positives + negatives).
    hyper : this round's hyperparameters: ``scorer``; ``lr_items`` for the item rows; under
        ``mlp`` ``lr_network`` and ``weight_decay`` for the head and user embedding, under
        ``dot`` ``lr_user`` and ``embedding_weight_decay`` for the user vector (and
        ``lr_user`` for ``b2``); ``epochs`` passes, ``batch_size`` the default batch.
    noise_multiplier : sigma >= 0 (0 = no noise, epsilon ``inf``).
    max_grad_norm : per-example L2 clipping bound over all trained parameters, > 0.
    seed : derives this client's sampling and noise streams from ``(seed, client)``.
    generator : alternatively, one generator for both; exactly one of ``seed``/``generator``.
    expected_batch_size : loader batch size ``B`` in [1, m] (default ``hyper.batch_size``);
        Poisson rate ``q = 1 / ceil(m / B)``.
    delta : delta of the reported epsilon, in (0, 1); keep it well below ``1 / m``.
    accountant : ``"rdp"`` or ``"prv"``.
    teacher_row : [I] the preference scores of the client's group, or None.
    group : the client's group (-1 = none: no distillation).
    rows : int64 [R] sorted item ids the client's item tables cover, a superset of ``items``;
        None = the items of ``items`` (data-dependent; see the module docstring).

    Returns
    -------
    update : CohortUpdate with a single client (same layout as ``train_client``'s).
    report : DPSGDReport of the round.

    Raises
    ------
    ConfigError
        On a negative or non-finite ``noise_multiplier``, a ``max_grad_norm <= 0``, a batch
        larger than the client's data, a bad ``delta``/``accountant``/``rows``, or not exactly
        one of ``seed``/``generator``.
    """
    sigma = _check_sigma(noise_multiplier)
    clip = _check_clip(max_grad_norm)
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    client = int(client)
    gen_sampling, gen_noise = _generators(seed, generator, client)
    items = np.asarray(items, dtype=np.int64).reshape(-1)
    labels_np = np.asarray(labels, dtype=np.float32).reshape(-1)
    if labels_np.size != items.size:
        raise ConfigError(f"items and labels differ in length: {items.size} vs {labels_np.size}")
    n = int(items.size)
    if hyper.epochs < 1:
        raise ConfigError(f"hyper.epochs must be >= 1, got {hyper.epochs}")
    batch = hyper.batch_size if expected_batch_size is None else expected_batch_size
    if n:
        batch = _check_batch(batch, n, client)
    local_items, sample_row = _local_rows(items, rows, shared.n_items)

    distilling = teacher_row is not None and hyper.distill > 0 and group >= 0
    ema = float(store.ema_ratio[client])
    lam = hyper.distill * (1.0 if math.isnan(ema) else ema) if distilling else 0.0
    model = client_model(shared, store, backbone, client, local_items, hyper)

    sample_rate, expected, steps, epsilon = 0.0, 0, 0, 0.0
    batch_sizes: list[int] = []
    losses: list[float] = []
    if n:
        q_all = teacher_row[torch.from_numpy(items)].float() if distilling else torch.zeros(n)
        data = (torch.from_numpy(sample_row), torch.from_numpy(labels_np), q_all)
        acc, sample_rate, expected, batch_sizes, losses = _run_dpsgd(
            _PerExampleLoss(model, lam),
            client_sgd(model, hyper),
            data,
            batch_size=batch,
            epochs=hyper.epochs,
            sigma=sigma,
            clip=clip,
            accountant=accountant,
            gen_sampling=gen_sampling,
            gen_noise=gen_noise,
        )
        history = [(float(h[0]), float(h[1]), int(h[2])) for h in acc.history]
        steps = sum(h[2] for h in history)
        if sigma == 0.0:
            epsilon = math.inf
        elif len(history) == 1:  # one (sigma, q) for the whole round: the usual case, cached
            epsilon = _round_epsilon(*history[0], delta, accountant)
        else:
            epsilon = float(acc.get_epsilon(delta=delta))

    update = client_update(
        model, shared, store, backbone, client, local_items, n_samples=n, group=group, loss=float(np.mean(losses)) if losses else 0.0
    )
    report = DPSGDReport(
        client=client,
        n_samples=n,
        expected_batch_size=expected,
        sample_rate=sample_rate,
        steps=steps,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        delta=delta,
        epsilon=epsilon,
        accountant=accountant,
        distill_lambda=float(lam),
        batch_sizes=tuple(batch_sizes),
    )
    return update, report


def train_cohort_dpsgd(
    shared: SharedParams,
    store: ClientStateStore,
    backbone: BackboneSpec,
    clients: np.ndarray,
    sample_indptr: np.ndarray,
    sample_items: np.ndarray,
    sample_labels: np.ndarray,
    hyper: LocalHyper,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int,
    expected_batch_size: int | None = None,
    delta: float = 1e-5,
    accountant: str = "rdp",
    teacher: torch.Tensor | None = None,
    groups: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> tuple[CohortUpdate, list[DPSGDReport]]:
    """Train every client of ``clients`` with :func:`train_client_dpsgd`, one after another.

    The output has the layout of :func:`gfmfr_secure.client.cohort.train_cohort`: one row
    per client in cohort order, each client's touched rows contiguous and sorted.

    Parameters
    ----------
    clients : int64 [n] distinct user ids.
    sample_indptr, sample_items, sample_labels : this round's records of all users in CSR
        form ([U+1], [M], [M]).
    seed : each client's streams are derived from ``(seed, client)``, so a client's result
        does not depend on which other clients are in the cohort.
    expected_batch_size : loader batch size (default ``hyper.batch_size``); capped at each
        client's sample count, so a client with fewer samples takes full batches (``q = 1``).
    teacher : [G, I] group preference scores, or None (no distillation).
    groups : int64 [n] group of each client (-1 = none).
    rows : int64 [R] one data-independent row set for every client, or None (each client's
        own items).
    Other parameters: as :func:`train_client_dpsgd`.

    Returns
    -------
    update : CohortUpdate of the cohort.
    reports : one DPSGDReport per client, in cohort order.
    """
    clients = np.asarray(clients, dtype=np.int64).reshape(-1)
    n = clients.size
    if np.unique(clients).size != n:
        raise ValueError("cohort contains a client twice")
    g = None
    if teacher is not None and hyper.distill > 0:
        if groups is None:
            raise ValueError("distillation needs each client's group")
        g = np.asarray(groups, dtype=np.int64).reshape(-1)
        if g.size != n:
            raise ValueError(f"groups has {g.size} entries for {n} clients")
    counts, items, labels = cohort_samples(sample_indptr, sample_items, sample_labels, clients)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    batch = hyper.batch_size if expected_batch_size is None else expected_batch_size
    ups: list[CohortUpdate] = []
    reports: list[DPSGDReport] = []
    for j, c in enumerate(clients):
        sl = slice(int(starts[j]), int(starts[j + 1]))
        gj = int(g[j]) if g is not None else -1
        up, rep = train_client_dpsgd(
            shared,
            store,
            backbone,
            int(c),
            items[sl],
            labels[sl],
            hyper,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            seed=seed,
            expected_batch_size=min(batch, int(counts[j])) if counts[j] else batch,
            delta=delta,
            accountant=accountant,
            teacher_row=teacher[gj] if gj >= 0 else None,
            group=gj,
            rows=rows,
        )
        ups.append(up)
        reports.append(rep)
    d = shared.latent_dim
    sizes = np.array([u.row_items.size for u in ups], dtype=np.int64)
    update = CohortUpdate(
        clients=clients,
        n_samples=counts,
        row_ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        row_items=np.concatenate([u.row_items for u in ups]).astype(np.int64) if ups else np.empty(0, dtype=np.int64),
        item_delta=torch.cat([u.item_delta for u in ups]) if ups else torch.empty(0, d),
        head_delta=None if backbone.private_head or not ups else torch.cat([u.head_delta for u in ups]),
        head_after=torch.cat([u.head_after for u in ups]) if ups else None,
        group=np.full(n, -1, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64),
        loss=np.concatenate([u.loss for u in ups]) if ups else np.empty(0),
    )
    return update, reports


# --------------------------------------------------------------------------- composition


def compose_client_epsilon(
    events: Iterable[DPSGDReport | tuple[float, float, int]],
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon of one client over all the DP-SGD rounds it took part in.

    Every optimizer step of every round is one Poisson-subsampled Gaussian mechanism on
    the client's records; the steps are fed, in order, to a
    :class:`~gfmfr_secure.privacy.accounting.PrivacyLedger` (one event per step, the event's
    ``round`` field being the step index). A client in ``T`` rounds of ``s`` steps at the
    same ``(sigma, q)`` therefore gets ``epsilon_for(sigma, q, T * s, delta)``.

    Parameters
    ----------
    events : the client's :class:`DPSGDReport` s, or ``(noise_multiplier, sample_rate, steps)``
        triples, oldest first; rounds with 0 steps add nothing.
    delta : target delta in (0, 1).
    accountant : a name of :data:`gfmfr_secure.privacy.accounting.ACCOUNTANTS`.

    Returns
    -------
    float
        The composed epsilon (``0.0`` with no steps, ``inf`` if any step had sigma 0).
    """
    ledger = PrivacyLedger()
    k = 0
    for event in events:
        if isinstance(event, DPSGDReport):
            sigma, q, steps = event.noise_multiplier, event.sample_rate, event.steps
        else:
            sigma, q, steps = event
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ConfigError(f"steps must be an integer >= 0, got {steps!r}")
        for _ in range(int(steps)):
            ledger.append(PrivacyEvent(round=k, noise_multiplier=float(sigma), sample_rate=float(q)))
            k += 1
    return ledger.epsilon(delta, accountant)
