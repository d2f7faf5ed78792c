"""Local training of a whole cohort of clients in one call.

All sampled clients of a round train together. Their local item-table rows (one per
(client, item) pair drawn this round), heads and user embeddings are stacked, and
:func:`gfmfr_secure.client.kernel.train_clients` runs every client's local steps as
compiled loops, on a few worker threads that take clients as they free up. Clients
never share parameters: each keeps its own copy of the shared head and of the rows
it touches, exactly as if it trained alone, so the result is the same bit for bit
whatever the number of threads. :mod:`gfmfr_secure.client.local` is the per-client
reference (plain autograd); a test checks both give the same update.

Model and loss for one client and a batch ``j = 1..n`` (all means over the batch)::

    x_j = C[i_j] + P[i_j]                              # [d]
    z_j = W1u e + W1i x_j + b1;  a_j = relu(z_j)       # [h]
    l_j = w2 . a_j + b2;  p_j = sigmoid(l_j)
    base = BCE(p, y) - alpha * MSE(P[i], C[i]) + beta * mean|C[i]|
    loss = base + lambda * KL([q, 1-q] || [p, 1-p])   # q = teacher preference of the client's group
    lambda = ema(base / KL) * cos(pi t / 2T)           # the ratio is a running, detached statistic

``dloss/dl_j = ((p_j - y_j) + lambda (p_j - q_j)) / n``; the rest is the chain rule.
The minibatches are :func:`gfmfr_secure.client.plan.epoch_orders`' shuffles, the
ones the per-client path draws; they are computed on a worker thread while the
cohort's rows are gathered.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from gfmfr_secure.client.plan import epoch_orders
from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.models.backbones import BackboneSpec
from gfmfr_secure.models.params import SharedParams, flatten_heads, unflatten_heads
from gfmfr_secure.types import CohortUpdate, LocalHyper

__all__ = ["DENSE_KEYS", "TASKS_PER_WORKER", "cohort_samples", "train_cohort", "unique_keys"]

#: Clients are handed to the worker threads in this many batches per worker, so a
#: thread that finishes early takes more (any value gives the same result).
TASKS_PER_WORKER = 8


def cohort_samples(indptr: np.ndarray, items: np.ndarray, labels: np.ndarray, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gather the samples of ``clients`` from CSR arrays.

    Returns (counts int64 [n], items int64 [m], labels float32 [m]) with each client's
    samples contiguous, in cohort order.
    """
    start = indptr[clients]
    counts = (indptr[clients + 1] - start).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = np.repeat(start - offsets, counts) + np.arange(int(counts.sum()))
    return counts, items[idx], labels[idx]


#: Largest key range for which :func:`unique_keys` marks keys in a dense boolean array.
DENSE_KEYS = 1 << 26


def unique_keys(keys: np.ndarray, universe: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` for int64 keys in ``[0, universe)``.

    While the universe is at most :data:`DENSE_KEYS` and at most 16 times the number of
    keys, it marks the keys in a boolean array and ranks them with a cumulative sum (linear
    time: 12 against 46 ms for a round's 0.5M keys over 943 x 1682 pairs); otherwise it
    sorts, so a small cohort over many items costs what its keys cost, not the universe
    (1,000 clients over 50k items: 0.4 against 1.6 s of client training a round).
    """
    if universe > min(DENSE_KEYS, 16 * keys.size):
        return np.unique(keys, return_inverse=True)
    mark = np.zeros(universe, dtype=bool)
    mark[keys] = True
    rank = np.cumsum(mark, dtype=np.int64) - 1
    return np.flatnonzero(mark), rank[keys]


@torch.no_grad()
def train_cohort(
    shared: SharedParams,
    store: ClientStateStore,
    backbone: BackboneSpec,
    clients: np.ndarray,
    sample_indptr: np.ndarray,
    sample_items: np.ndarray,
    sample_labels: np.ndarray,
    hyper: LocalHyper,
    *,
    teacher: torch.Tensor | None = None,
    groups: np.ndarray | None = None,
    workers: int | None = None,
) -> CohortUpdate:
    """Train every client of ``clients`` locally for one round and return their uploads.

    Parameters
    ----------
    shared : global parameters broadcast this round (not modified).
    store : client-private state; the clients' rows are updated in place.
    backbone : which parameters exist and are shared.
    clients : int64 [n] distinct user ids.
    sample_indptr, sample_items, sample_labels : this round's training samples of all
        users in CSR form ([U+1], [M], [M]); positives and fresh negatives.
    hyper : this round's local hyperparameters.
    teacher : [G, I] group preference scores q, or None (no distillation this round).
    groups : int64 [n] group of each client (-1 = none, no distillation for it).
    workers : threads that train disjoint sets of clients at once (default
        ``torch.get_num_threads()``). Clients never share state, so the result does not
        depend on it.

    Returns
    -------
    CohortUpdate
        Item-table deltas on the rows each client touched, head deltas, losses.
    """
    clients = np.asarray(clients, dtype=np.int64)
    n, n_items, d = clients.size, shared.n_items, shared.latent_dim
    if np.unique(clients).size != n:
        raise ValueError("cohort contains a client twice")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    workers = torch.get_num_threads() if workers is None else workers
    if shared.item_table.dtype != torch.float32:
        raise ValueError(f"client training runs in float32; the item table is {shared.item_table.dtype}")
    counts, items, labels = cohort_samples(sample_indptr, sample_items, sample_labels, clients)
    owner = np.repeat(np.arange(n), counts)
    sample_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    with ThreadPoolExecutor(max_workers=1) as planner:
        # The shuffle loop releases the interpreter lock: draw the shuffles while the rows are gathered.
        orders_future = planner.submit(epoch_orders, clients, counts, epochs=hyper.epochs, seed=hyper.shuffle_seed)
        # Local item rows: one per (client, item) pair seen this round, sorted by client
        # then item; a client's rows are its own, so clients can train concurrently.
        uniq, inverse = unique_keys(owner * n_items + items, n * n_items)
        row_owner = uniq // n_items
        row_items = uniq % n_items
        row_ptr = np.searchsorted(row_owner, np.arange(n + 1)).astype(np.int64)
        # The personal rows are trained in place in the store's buffer: a zero row is
        # stored for each pair seen for the first time (the state's semantics, state.py).
        p_slot = store.personal.slots_for(clients[row_owner] * n_items + row_items) if backbone.personal_items else None
        orders = orders_future.result()
    c_loc = torch.empty(row_items.size, d, dtype=shared.item_table.dtype)  # becomes the item deltas

    # Stacked per-client parameters, in cohort order.
    if backbone.private_head:
        if store.heads is None:
            raise ValueError("backbone has a private head but the client store holds none")
        w1u, w1i, b1, w2, b2 = (t.clone(memory_format=torch.contiguous_format) for t in unflatten_heads(store.heads[torch.from_numpy(clients)], d))
    else:
        # Every client trains its own copy of the shared head (a fresh contiguous tensor:
        # expand().contiguous() alone would return a view for a cohort of one).
        def copies(t: torch.Tensor) -> torch.Tensor:
            return torch.empty((n, *t.shape), dtype=t.dtype).copy_(t.expand(n, *t.shape))

        w1u, w1i, b1, w2 = (copies(t) for t in (shared.w1_user, shared.w1_item, shared.b1, shared.w2))
        b2 = copies(shared.b2.reshape(()))
    client_idx = torch.from_numpy(clients)
    emb = store.user_embedding[client_idx].contiguous()  # a copy (advanced indexing)
    ema = store.ema_ratio[client_idx]  # float64, a copy

    distilling = np.zeros(n, dtype=np.bool_)
    q_sample = np.zeros(items.size, dtype=np.float32)
    if teacher is not None and hyper.distill > 0:
        if groups is None:
            raise ValueError("distillation needs each client's group")
        g = np.asarray(groups, dtype=np.int64)
        distilling = g >= 0
        sel = distilling[owner]
        q_sample[sel] = teacher[torch.from_numpy(g[owner[sel]]), torch.from_numpy(items[sel])].float().numpy()

    loss_sum = np.zeros(n, dtype=np.float64)
    step_count = np.zeros(n, dtype=np.float64)
    alpha, beta = (hyper.alpha, hyper.beta) if backbone.fedrap_regularisers else (0.0, 0.0)
    has_personal = p_slot is not None
    p_buf = store.personal.buffer.numpy() if has_personal else np.zeros((0, d), dtype=np.float32)
    args = (
        sample_ptr, orders, inverse.reshape(-1).astype(np.int64), labels.astype(np.float32, copy=False), q_sample,
        distilling, shared.item_table.contiguous().numpy(), row_items, row_ptr, c_loc.numpy(), p_buf,
        p_slot if has_personal else np.zeros(0, dtype=np.int64),
        w1u.numpy(), w1i.numpy(), b1.numpy(), w2.numpy(), b2.numpy(),
        emb.numpy(), ema.numpy(), loss_sum, step_count, int(hyper.batch_size), float(hyper.lr_network),
        float(hyper.lr_items), float(hyper.weight_decay), float(alpha), float(beta), float(hyper.distill),
        float(hyper.ema_decay), float(hyper.max_ratio), has_personal, bool(backbone.user_embedding),
        hyper.scorer == "dot", float(hyper.lr_user), float(hyper.embedding_weight_decay),
    )
    # Clients with the most samples first, in small batches of clients that the threads
    # take as they free up; BLAS runs single-threaded inside each.
    from gfmfr_secure.client.kernel import train_clients  # here: importing Numba takes ~0.5 s

    by_work = np.argsort(-counts, kind="stable")
    tasks = np.array_split(by_work, max(1, min(n, workers * TASKS_PER_WORKER))) if n else []
    with threadpool_limits(limits=1, user_api="blas"):
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                train_clients(task, *args)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(lambda task: train_clients(task, *args), tasks):
                    pass  # consuming the results re-raises a worker's exception here

    heads_after = flatten_heads(w1u, w1i, b1, w2, b2)
    if backbone.user_embedding:
        store.user_embedding[client_idx] = emb
    store.ema_ratio[client_idx] = ema
    if backbone.private_head:
        store.heads[client_idx] = heads_after
        head_delta = None
    else:
        head_delta = heads_after - shared.head_flat().unsqueeze(0)
    loss = loss_sum / np.maximum(step_count, 1.0)
    return CohortUpdate(
        clients=clients,
        n_samples=counts,
        row_ptr=row_ptr,
        row_items=row_items,
        item_delta=c_loc,
        head_delta=head_delta,
        head_after=heads_after,
        group=np.full(n, -1, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64),
        loss=loss,
    )
