"""Vectorised local training of a whole cohort of clients.

All sampled clients of a round train together: their heads, user embeddings and
local item-table rows are stacked, and every global step runs one batched forward
and a hand-derived backward pass for all clients still active at that step (see
:mod:`gfmfr_secure.client.plan`). Clients never share parameters: each keeps its
own copy of the shared head and of the item-table rows it touches, exactly as if it
trained alone. :mod:`gfmfr_secure.client.local` is the per-client reference (plain
autograd); a test checks both give the same update.

Model and loss for one client and a batch ``j = 1..n`` (all means over the batch)::

    x_j = C[i_j] + P[i_j]                              # [d]
    z_j = W1u e + W1i x_j + b1;  a_j = relu(z_j)       # [h]
    l_j = w2 . a_j + b2;  p_j = sigmoid(l_j)
    base = BCE(p, y) - alpha * MSE(P[i], C[i]) + beta * mean|C[i]|
    loss = base + lambda * KL([q, 1-q] || [p, 1-p])   # q = teacher preference of the client's group
    lambda = ema(base / KL) * cos(pi t / 2T)           # the ratio is a running, detached statistic

``dloss/dl_j = ((p_j - y_j) + lambda (p_j - q_j)) / n``; the rest is the chain rule.

Execution (it changes no result beyond float rounding): a global step runs over
blocks of about :data:`CHUNK_SAMPLES` samples, so a block's ``[clients, batch, d]``
intermediates stay in cache, and each block is cut to its widest batch. A step's
blocks touch disjoint clients, so they run on a pool of worker threads, each on
single-threaded kernels (no OpenMP wake-up per kernel). Updated item rows are
written back with one whole-row copy per block (:func:`_copy_rows_`) after summing
the gradients of an item drawn twice in a batch, rather than with a serial
scatter-add. The step plan is built on a worker thread while the cohort's rows are
gathered.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import repeat

import numpy as np
import torch
import torch.nn.functional as F

from gfmfr_secure.client.plan import build_step_plan
from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.models.backbones import BackboneSpec
from gfmfr_secure.models.params import SharedParams, flatten_heads, unflatten_heads
from gfmfr_secure.types import CohortUpdate, LocalHyper

__all__ = ["CHUNK_SAMPLES", "cohort_samples", "train_cohort"]

#: Samples per block of clients in one step (block = CHUNK_SAMPLES // batch_size clients):
#: about 12k samples keep a block's [nk, B, d] intermediates (about 3 MiB each) in cache.
CHUNK_SAMPLES = 12288


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


def _xlogx(q: torch.Tensor) -> torch.Tensor:
    return torch.xlogy(q, q)


def _duplicate_slots(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Slots of a batch whose row already occurs earlier in the same batch.

    ``rows`` is int64 [nk, B] (one batch per client; a negative drawn twice, or the
    shared padding row, repeats). Returns flat slot indices (``dup``, ``first``): each
    repeated slot and the first slot of its row, or None when every row is unique.
    """
    nk, width = rows.shape
    sorted_rows, perm = torch.sort(rows, dim=1, stable=True)
    starts = torch.ones_like(sorted_rows, dtype=torch.bool)
    starts[:, 1:] = sorted_rows[:, 1:] != sorted_rows[:, :-1]
    if bool(starts.all()):
        return None
    pos = torch.arange(width).expand(nk, width)
    run_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values  # [nk, B]
    flat = torch.nonzero(~starts.view(-1)).squeeze(1)  # repeated slots, in sorted order
    base = flat - flat % width
    perm = perm.view(-1)
    return perm.index_select(0, flat) + base, perm.index_select(0, run_start.view(-1).index_select(0, flat) + base) + base


def _copy_rows_(table: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> None:
    """``table[rows] = new`` for a contiguous 2-D float table, one memory copy per row.

    NumPy copies each ``[d]`` row as a single opaque item (a ``void`` dtype of the
    row's size) and releases the interpreter lock while doing so; PyTorch's
    ``index_copy_`` addresses every element and is about 3.5x slower here (about 100
    against 350 us for 12k rows of 64 floats). A repeated row is written more than
    once; callers give every occurrence the same value.
    """
    t, n = table.numpy(), new.contiguous().numpy()
    row = np.dtype((np.void, t.shape[1] * t.itemsize))
    t.view(row).reshape(-1)[rows.numpy()] = n.view(row).reshape(-1)


def _sgd_rows_(
    table: torch.Tensor,
    rows: torch.Tensor,
    old: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    dups: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """``table[rows] -= lr * grad``, summing the gradients of repeated rows.

    ``old`` [.., d] holds ``table[rows]`` as gathered for this step. The new rows are
    computed out of place and written back with one row copy (:func:`_copy_rows_`),
    which (unlike a scatter-add) needs no ordering; a row that occurs several times
    gets all its gradients and every occurrence writes the same value.
    """
    d = table.shape[1]
    new = torch.add(old.reshape(-1, d), grad.reshape(-1, d), alpha=-lr)
    if dups is not None:
        dup, first = dups
        new.index_add_(0, first, grad.reshape(-1, d).index_select(0, dup), alpha=-lr)
        new.index_copy_(0, dup, new.index_select(0, first))
    _copy_rows_(table, rows, new)


def _local_grads(
    c_b: torch.Tensor,
    p_b: torch.Tensor | None,
    y: torch.Tensor,
    vm: torch.Tensor,
    q: torch.Tensor | None,
    dist: torch.Tensor | None,
    prev_ema: torch.Tensor | None,
    W1u: torch.Tensor,
    W1i: torch.Tensor,
    B1: torch.Tensor,
    W2: torch.Tensor,
    B2: torch.Tensor,
    E: torch.Tensor,
    alpha: float,
    beta: float,
    distill: float,
    ema_decay: float,
    max_ratio: float,
) -> tuple[torch.Tensor | None, ...]:
    """Loss and gradients of one local step for a block of ``nk`` clients (pure function).

    Parameters (``B`` = the block's batch width, padding slots have ``vm = 0`` and
    read the zero row)
    ----------
    c_b, p_b : [nk, B, d] shared and personal item rows of the batch (``p_b`` None
        without personal tables).
    y, vm : [nk, B] labels and validity mask.
    q, dist, prev_ema : teacher preferences [nk, B], which clients distil (bool
        [nk]) and their running loss ratios (float64 [nk]); all None without
        distillation.
    W1u, W1i : [nk, h, d]; B1, W2 : [nk, h]; B2 : [nk]; E : [nk, d] the clients' heads
        and user embeddings.
    alpha, beta, distill, ema_decay, max_ratio : this round's loss weights.

    Returns
    -------
    loss [nk] float64, new running ratios [nk] float64 (or None), and the gradients
    of C [nk, B, d], P [nk, B, d] (or None), W1u, W1i, b1, w2, b2 and E.
    """
    d = c_b.shape[2]
    nval = vm.sum(1)  # [nk], >= 1
    x = c_b + p_b if p_b is not None else c_b
    u_term = torch.baddbmm(B1.unsqueeze(2), W1u, E.unsqueeze(2)).squeeze(2)  # [nk, h]
    a = torch.baddbmm(u_term.unsqueeze(1), x, W1i.transpose(1, 2)).relu_()  # [nk, B, h]
    logit = torch.baddbmm(B2.view(-1, 1, 1), a, W2.unsqueeze(2)).squeeze(2)  # [nk, B]
    p = torch.sigmoid(logit)

    base = ((F.softplus(logit) - y * logit) * vm).sum(1) / nval  # BCE
    diff = None
    if alpha and p_b is not None:
        diff = p_b - c_b
        base = base - alpha * (torch.linalg.vecdot(diff, diff) * vm).sum(1) / (nval * d)
    sign_c = None
    if beta:
        sign_c = torch.sign(c_b)
        base = base + beta * (torch.linalg.vecdot(c_b, sign_c) * vm).sum(1) / (nval * d)  # sum |C|
    gl = (p - y) * vm
    loss_c = base.double()
    ema_new = None
    if q is not None and dist is not None and prev_ema is not None:
        kl_elem = _xlogx(q) + _xlogx(1 - q) - q * F.logsigmoid(logit) - (1 - q) * F.logsigmoid(-logit)
        kl = (kl_elem * vm).sum(1) / nval
        ratio = (base.double() / (kl.double() + 1e-8)).clamp(max=max_ratio)
        new = torch.where(torch.isnan(prev_ema), ratio, ema_decay * prev_ema + (1 - ema_decay) * ratio)
        ema_new = torch.where(dist, new, prev_ema)
        lam = torch.where(dist, ema_new * distill, torch.zeros_like(prev_ema))
        loss_c = loss_c + lam * kl.double()
        gl = gl + lam.to(torch.float32).unsqueeze(1) * (p - q) * vm
    gl = gl / nval.unsqueeze(1)

    g_b2 = gl.sum(1)
    g_w2 = torch.bmm(gl.unsqueeze(1), a).squeeze(1)  # [nk, h]
    # dL/dz = gl * w2 * [z > 0]; keep m = gl * [z > 0] (one pass, ReLU's backward kernel)
    # and fold w2 into the small [nk, h, d] factors instead of the [nk, B, h] tensor.
    m = torch.ops.aten.threshold_backward(gl.unsqueeze(2).expand_as(a), a, 0.0)  # [nk, B, h]
    del a
    g_w1i = torch.bmm(m.transpose(1, 2), x).mul_(W2.unsqueeze(2))  # [nk, h, d]
    g_b1 = m.sum(1).mul_(W2)  # [nk, h]
    g_w1u = g_b1.unsqueeze(2) * E.unsqueeze(1)  # [nk, h, d]
    g_e = torch.bmm(g_b1.unsqueeze(1), W1u).squeeze(1)  # [nk, d]
    gx = torch.bmm(m, W1i * W2.unsqueeze(2))  # [nk, B, d]
    del m

    # FedRAP's regularisers: d/dP = -2a (P - C) / (n d), d/dC = +2a (P - C) / (n d) + b sign(C) / (n d)
    g_c = gx
    g_p = gx if p_b is not None else None
    if alpha or beta:
        scale = (vm / (nval * d).unsqueeze(1)).unsqueeze(2)  # [nk, B, 1]
        if diff is not None:
            g_p = torch.addcmul(gx, diff, scale, value=-2 * alpha)
            g_c = torch.addcmul(gx, diff, scale, value=2 * alpha)
        if sign_c is not None:
            g_c = torch.addcmul(g_c, sign_c, scale, value=beta)
    return loss_c, ema_new, g_c, g_p, g_w1u, g_w1i, g_b1, g_w2, g_b2, g_e


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
    chunk_clients: int | None = None,
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
    chunk_clients : clients per block within a step (default ``CHUNK_SAMPLES // batch_size``);
        any value gives the same result, it only trades cache use against call overhead.
    workers : threads that run a step's blocks of clients in parallel, each block on
        single-threaded kernels (default ``torch.get_num_threads()``; 1 = blocks one
        after another on the multi-threaded kernels). Blocks touch disjoint clients,
        so the result does not depend on it.

    Returns
    -------
    CohortUpdate
        Item-table deltas on the rows each client touched, head deltas, losses.
    """
    clients = np.asarray(clients, dtype=np.int64)
    n, n_items, d = clients.size, shared.n_items, shared.latent_dim
    if np.unique(clients).size != n:
        raise ValueError("cohort contains a client twice")
    counts, items, labels = cohort_samples(sample_indptr, sample_items, sample_labels, clients)
    owner = np.repeat(np.arange(n), counts)

    with ThreadPoolExecutor(max_workers=1) as planner:
        # The plan's sorts release the interpreter lock: build it while the rows are gathered.
        plan_future = planner.submit(
            build_step_plan, clients, counts, batch_size=hyper.batch_size, epochs=hyper.epochs, seed=hyper.shuffle_seed
        )
        # Local item rows: one per (client, item) pair seen this round, sorted by client then
        # item, plus one zero row at the end that the padding slots of the step grid read and
        # write (their gradient is exactly zero, so it stays 0).
        keys = owner * n_items + items
        uniq, inverse = np.unique(keys, return_inverse=True)
        n_rows = int(uniq.size)
        row_owner = uniq // n_items
        row_items = uniq % n_items
        row_ptr = np.searchsorted(row_owner, np.arange(n + 1)).astype(np.int64)
        row_items_t = torch.from_numpy(row_items)
        c_loc = torch.zeros(n_rows + 1, d, dtype=shared.item_table.dtype)
        torch.index_select(shared.item_table, 0, row_items_t, out=c_loc[:n_rows])
        p_loc = None
        if backbone.personal_items:
            p_loc = torch.zeros(n_rows + 1, d, dtype=shared.item_table.dtype)
            store.personal.gather(clients[row_owner] * n_items + row_items, out=p_loc[:n_rows])
        plan = plan_future.result()
    order_t = torch.from_numpy(plan.order)

    # Stacked per-client parameters, in plan order so active clients form a prefix.
    if backbone.private_head:
        if store.heads is None:
            raise ValueError("backbone has a private head but the client store holds none")
        w1u, w1i, b1, w2, b2 = (t.clone() for t in unflatten_heads(store.heads[torch.from_numpy(clients)][order_t], d))
    else:
        w1u = shared.w1_user.expand(n, -1, -1).clone()
        w1i = shared.w1_item.expand(n, -1, -1).clone()
        b1 = shared.b1.expand(n, -1).clone()
        w2 = shared.w2.expand(n, -1).clone()
        b2 = shared.b2.expand(n).clone()
    emb = store.user_embedding[torch.from_numpy(clients)][order_t].clone()

    distilling = torch.zeros(n, dtype=torch.bool)
    q_sample = None
    if teacher is not None and hyper.distill > 0:
        if groups is None:
            raise ValueError("distillation needs each client's group")
        g = np.asarray(groups, dtype=np.int64)
        dist_np = g >= 0
        distilling = torch.from_numpy(dist_np[plan.order])
        q_sample = torch.zeros(items.size, dtype=torch.float32)
        sel = dist_np[owner]
        q_sample[torch.from_numpy(np.flatnonzero(sel))] = teacher[torch.from_numpy(g[owner[sel]]), torch.from_numpy(items[sel])].float()
    ema = store.ema_ratio[torch.from_numpy(clients)][order_t].clone()

    # Sample ids are shifted by one so that the grid's padding entry -1 selects the zero row.
    sample_row = torch.from_numpy(np.concatenate([[n_rows], inverse.reshape(-1)]).astype(np.int64))
    labels_t = torch.from_numpy(np.concatenate([[0.0], labels]).astype(np.float32))
    q_ext = torch.cat([torch.zeros(1), q_sample]) if q_sample is not None else None
    grid = torch.from_numpy(plan.grid)
    loss_sum = torch.zeros(n, dtype=torch.float64)
    step_count = torch.zeros(n, dtype=torch.float64)
    lr_n, lr_i, wd = hyper.lr_network, hyper.lr_items, hyper.weight_decay
    alpha, beta = (hyper.alpha, hyper.beta) if backbone.fedrap_regularisers else (0.0, 0.0)
    chunk = chunk_clients if chunk_clients is not None else max(1, CHUNK_SAMPLES // hyper.batch_size)
    if chunk < 1:
        raise ValueError(f"chunk_clients must be >= 1, got {chunk}")

    def run_block(s_step: torch.Tensor, first_row: int, lo: int, hi: int) -> None:
        """One block of clients ``lo:hi`` (plan order) through one local step, in place."""
        nk = hi - lo
        width = int(plan.row_valid[first_row + lo : first_row + hi].max())  # widest batch of the block
        s1 = (s_step[lo:hi, :width] + 1).reshape(-1)  # [nk * width], 0 = padding
        vm = (s1 > 0).to(torch.float32).view(nk, -1)
        flat_rows = sample_row.index_select(0, s1)  # [nk * B]
        y = labels_t.index_select(0, s1).view(nk, -1)
        c_b = c_loc.index_select(0, flat_rows).view(nk, -1, d)  # [nk, B, d]
        p_b = p_loc.index_select(0, flat_rows).view(nk, -1, d) if p_loc is not None else None
        W1u, W1i, B1, W2, B2, E = w1u[lo:hi], w1i[lo:hi], b1[lo:hi], w2[lo:hi], b2[lo:hi], emb[lo:hi]
        q = dist = prev = None
        if q_ext is not None:
            q = q_ext.index_select(0, s1).view(nk, -1)
            dist, prev = distilling[lo:hi], ema[lo:hi]
        loss_c, ema_new, g_c, g_p, g_w1u, g_w1i, g_b1, g_w2, g_b2, g_e = _local_grads(
            c_b, p_b, y, vm, q, dist, prev, W1u, W1i, B1, W2, B2, E,
            alpha, beta, hyper.distill, hyper.ema_decay, hyper.max_ratio,
        )
        if ema_new is not None:
            ema[lo:hi] = ema_new
        loss_sum[lo:hi] += loss_c
        step_count[lo:hi] += 1

        dups = _duplicate_slots(flat_rows.view(nk, -1))
        _sgd_rows_(c_loc, flat_rows, c_b, g_c, lr_i, dups)
        if p_loc is not None:
            _sgd_rows_(p_loc, flat_rows, p_b, g_p, lr_i, dups)
        decay = 1.0 - lr_n * wd
        W1u.mul_(decay).sub_(g_w1u, alpha=lr_n)
        W1i.mul_(decay).sub_(g_w1i, alpha=lr_n)
        B1.mul_(decay).sub_(g_b1, alpha=lr_n)
        W2.mul_(decay).sub_(g_w2, alpha=lr_n)
        B2.mul_(decay).sub_(g_b2, alpha=lr_n)
        if backbone.user_embedding:
            E.mul_(decay).sub_(g_e, alpha=lr_n)

    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    workers = torch.get_num_threads() if workers is None else workers
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    threads_before = torch.get_num_threads()
    try:
        if pool is not None:
            torch.set_num_threads(1)  # parallel over blocks of clients, not inside each kernel
        for k in range(plan.n_steps):
            first_row = int(plan.offsets[k])
            s_step = grid[first_row : int(plan.offsets[k + 1])]  # [active, B]
            active = int(plan.active[k])
            # Clients are independent: the step runs over blocks of clients small enough
            # for a block's [nk, B, d] intermediates to stay in cache, at least one block
            # per worker thread.
            n_blocks = max(-(-active // chunk), min(workers, active))
            size = -(-active // n_blocks)
            bounds = [(lo, min(lo + size, active)) for lo in range(0, active, size)]
            if pool is None or len(bounds) == 1:
                for lo, hi in bounds:
                    run_block(s_step, first_row, lo, hi)
            else:
                los, his = zip(*bounds)
                for _ in pool.map(run_block, repeat(s_step), repeat(first_row), los, his):
                    pass  # consuming the results re-raises a block's exception here
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(threads_before)
    c_loc = c_loc[:n_rows]
    if p_loc is not None:
        p_loc = p_loc[:n_rows]

    # Back to cohort order.
    rank = torch.empty(n, dtype=torch.long)
    rank[order_t] = torch.arange(n)
    heads_after = flatten_heads(w1u, w1i, b1, w2, b2)[rank]
    client_idx = torch.from_numpy(clients)
    if backbone.user_embedding:
        store.user_embedding[client_idx] = emb[rank]
    store.ema_ratio[client_idx] = ema[rank]
    if p_loc is not None:
        store.personal.put(clients[row_owner] * n_items + row_items, p_loc)
    if backbone.private_head:
        store.heads[client_idx] = heads_after
        head_delta = None
    else:
        head_delta = heads_after - shared.head_flat().unsqueeze(0)
    loss = (loss_sum / step_count.clamp(min=1))[rank].numpy()
    return CohortUpdate(
        clients=clients,
        n_samples=counts,
        row_ptr=row_ptr,
        row_items=row_items,
        item_delta=c_loc.sub_(shared.item_table.index_select(0, row_items_t)),  # c_loc is not used after this
        head_delta=head_delta,
        head_after=heads_after,
        group=np.full(n, -1, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64),
        loss=loss,
    )
