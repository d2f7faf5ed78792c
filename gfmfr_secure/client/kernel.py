"""The client's local round as one compiled loop per client (Numba).

:func:`train_clients` runs every local step of a list of clients: gather the batch's
item rows, forward through the head, loss with FedRAP's regularisers and the
distillation term, hand-derived backward, SGD on the head, the user embedding and
the batch's item rows. The three ``[n, d] x [d, h]`` products of a step go to BLAS
(``np.dot``); everything else is fused loops over a batch that stays in the core's
cache. A client's steps run one after another, as on its own device, and clients
never share a row or a parameter, so any split of a cohort across threads (the
function releases the interpreter lock) gives the same result bit for bit.

The model and loss are :mod:`gfmfr_secure.client.cohort`'s. For one client and a
batch ``j = 1..n``::

    x_j = C[r_j] + P[r_j];  a_j = relu(W1i x_j + W1u e + b1);  l_j = w2 . a_j + b2
    base = mean_j BCE(l_j, y_j) - alpha mean_j |P_j - C_j|^2 / d + beta mean_j |C_j|_1 / d
    lambda = ema(min(base / (KL + 1e-8), max_ratio)) * distill     (distilling clients only)
    dloss/dl_j = ((p_j - y_j) + lambda (p_j - q_j)) / n

An item drawn twice in a batch receives the sum of its gradients: every gradient is
computed from the rows as they were at the start of the step, then subtracted.

:func:`shuffle_orders` computes the epochs' minibatch orders
(:func:`gfmfr_secure.client.plan.epoch_orders`) client by client.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from gfmfr_secure.client.plan import _GOLD, _M1, _M2  # the shuffle's hash constants

__all__ = ["shuffle_orders", "train_clients"]


@njit(cache=True, nogil=True)
def _softplus(x: float) -> float:
    """log(1 + exp(x)), stable for large |x|."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@njit(cache=True, nogil=True)
def _xlogx(v: float) -> float:
    return v * math.log(v) if v > 0.0 else 0.0


@njit(cache=True, nogil=True, fastmath={"contract", "reassoc"})
def train_clients(
    sel,
    sample_ptr,
    orders,
    sample_row,
    labels,
    q,
    distilling,
    shared_table,
    row_items,
    row_ptr,
    C,
    P,
    p_slot,
    W1u,
    W1i,
    b1,
    w2,
    b2,
    E,
    ema,
    loss_sum,
    step_count,
    batch_size,
    lr_n,
    lr_i,
    weight_decay,
    alpha,
    beta,
    distill,
    ema_decay,
    max_ratio,
    has_personal,
    train_embedding,
    dot,
    lr_u,
    wd_emb,
):
    """Train the clients ``sel`` for one round, in place.

    Parameters
    ----------
    sel : int64 [k] cohort positions of the clients to train.
    sample_ptr : int64 [n + 1] each cohort client's range in the sample arrays.
    orders : int64 [epochs, M] each epoch's order of the samples, a permutation within
        every client's range (:func:`gfmfr_secure.client.plan.epoch_orders`); batches are
        consecutive runs of ``batch_size`` in that order.
    sample_row : int64 [M] row of ``C`` / ``P`` that each sample reads.
    labels, q : float32 [M] labels and teacher preferences (q is read only for
        distilling clients).
    distilling : bool [n] which clients have a teacher this round.
    shared_table : float32 [I, d] the broadcast shared item table (read only).
    row_items, row_ptr : int64 [R], [n + 1] the item of each local row, and each
        client's range of local rows.
    C : float32 [R, d] output: each local row's change of the shared table (the client
        starts from ``shared_table[row_items]``, trains, and the start is subtracted).
    P, p_slot : the personal rows' buffer [*, d] and the buffer row of each local row
        [R], trained in place (:meth:`RowStore.slots_for`); ignored unless ``has_personal``.
    W1u, W1i : float32 [n, h, d]; b1, w2 : float32 [n, h]; b2 : float32 [n];
        E : float32 [n, d] the clients' heads and user embeddings (updated; ``E`` only
        when ``train_embedding``).
    ema : float64 [n] running base/KL ratios, NaN before the first (updated).
    loss_sum, step_count : float64 [n] accumulated step losses and step counts.
    The remaining scalars are the round's hyperparameters (:class:`~gfmfr_secure.types.LocalHyper`).
    """
    d = C.shape[1]
    h = W1i.shape[1]
    epochs = orders.shape[0]
    X = np.empty((batch_size, d), dtype=np.float32)
    Cb = np.empty((batch_size, d), dtype=np.float32)
    Pb = np.empty((batch_size, d), dtype=np.float32)
    A = np.empty((batch_size, h), dtype=np.float32)
    logit = np.empty(batch_size, dtype=np.float32)
    gl = np.empty(batch_size, dtype=np.float32)
    rows = np.empty(batch_size, dtype=np.int64)
    u = np.empty(h, dtype=np.float32)
    g_b1 = np.empty(h, dtype=np.float32)
    g_w2 = np.empty(h, dtype=np.float32)
    g_e = np.empty(d, dtype=np.float32)
    decay = np.float32(1.0 - lr_n * weight_decay)
    lr_n32 = np.float32(lr_n)
    lr_i32 = np.float32(lr_i)
    lr_u32 = np.float32(lr_u)
    decay_u = np.float32(1.0 - lr_u * wd_emb)
    wd_rows = np.float32(wd_emb)
    v = np.empty(d, dtype=np.float32)
    for t in range(sel.size):
        c = sel[t]
        start = sample_ptr[c]
        count = sample_ptr[c + 1] - start
        w1u = W1u[c]
        w1i = W1i[c]
        bias1 = b1[c]
        out = w2[c]
        e = E[c]
        dist = distilling[c]
        for r in range(row_ptr[c], row_ptr[c + 1]):
            for i in range(d):
                C[r, i] = shared_table[row_items[r], i]
        for epoch in range(epochs):
            for b0 in range(0, count, batch_size):
                n = min(batch_size, count - b0)
                # gather the batch's rows
                for j in range(n):
                    r = sample_row[orders[epoch, start + b0 + j]]
                    rows[j] = r
                    for i in range(d):
                        Cb[j, i] = C[r, i]
                    if has_personal:
                        pr = p_slot[r]
                        for i in range(d):
                            Pb[j, i] = P[pr, i]
                            X[j, i] = Cb[j, i] + Pb[j, i]
                    else:
                        for i in range(d):
                            X[j, i] = Cb[j, i]
                Xn = X[:n]
                bias2 = b2[c]
                # forward
                if dot:  # the user vector v = e + w2 scores the item vectors
                    for i in range(d):
                        v[i] = e[i] + out[i]
                    Z = A[:n]  # unused by the dot scorer
                else:
                    for k in range(h):
                        acc = bias1[k]
                        for i in range(d):
                            acc += w1u[k, i] * e[i]
                        u[k] = acc
                    Z = np.dot(Xn, w1i.T)  # [n, h]
                bce = 0.0
                kl = 0.0
                reg_mse = 0.0
                reg_abs = 0.0
                reg_l2 = 0.0
                for j in range(n):
                    acc = bias2
                    if dot:
                        for i in range(d):
                            acc += v[i] * Xn[j, i]
                    else:
                        for k in range(h):
                            zk = Z[j, k] + u[k]
                            zk = zk if zk > 0.0 else np.float32(0.0)
                            A[j, k] = zk
                            acc += out[k] * zk
                    logit[j] = acc
                    lj = float(acc)
                    s = orders[epoch, start + b0 + j]
                    bce += _softplus(lj) - labels[s] * lj
                    if dist:
                        qj = float(q[s])
                        kl += _xlogx(qj) + _xlogx(1.0 - qj) + qj * _softplus(-lj) + (1.0 - qj) * _softplus(lj)
                    if alpha != 0.0 and has_personal:
                        sq = 0.0
                        for i in range(d):
                            diff = Pb[j, i] - Cb[j, i]
                            sq += diff * diff
                        reg_mse += sq
                    if dot and wd_rows != 0.0:
                        sq = 0.0
                        for i in range(d):
                            sq += Cb[j, i] * Cb[j, i]
                            if has_personal:
                                sq += Pb[j, i] * Pb[j, i]
                        reg_l2 += sq
                    if beta != 0.0:
                        ab = 0.0
                        for i in range(d):
                            ab += abs(Cb[j, i])
                        reg_abs += ab
                base = bce / n
                if alpha != 0.0 and has_personal:
                    base -= alpha * reg_mse / (n * d)
                if beta != 0.0:
                    base += beta * reg_abs / (n * d)
                if dot and wd_rows != 0.0:
                    base += 0.5 * wd_rows * reg_l2 / n
                loss = base
                lam = 0.0
                if dist:
                    kl /= n
                    ratio = min(base / (kl + 1e-8), max_ratio)
                    prev = ema[c]
                    new = ratio if math.isnan(prev) else ema_decay * prev + (1.0 - ema_decay) * ratio
                    ema[c] = new
                    lam = new * distill
                    loss += lam * kl
                loss_sum[c] += loss
                step_count[c] += 1.0
                # backward: gl_j = dloss/dl_j; A becomes M = dloss/dz (w2 folded in)
                lam32 = np.float32(lam)
                inv_n = np.float32(1.0 / n)
                g_b2 = np.float32(0.0)
                for k in range(h):
                    g_b1[k] = 0.0
                    g_w2[k] = 0.0
                for j in range(n):
                    s = orders[epoch, start + b0 + j]
                    pj = np.float32(1.0) / (np.float32(1.0) + np.exp(-logit[j]))
                    g = pj - labels[s]
                    if dist:
                        g += lam32 * (pj - q[s])
                    g *= inv_n
                    gl[j] = g
                    g_b2 += g
                    if not dot:
                        for k in range(h):
                            a = A[j, k]
                            g_w2[k] += g * a
                            m = g * out[k] if a > 0.0 else np.float32(0.0)
                            A[j, k] = m
                            g_b1[k] += m
                if dot:  # dl/dv = sum_j g_j x_j (for e and w2 alike); dl/dx_j = g_j v
                    for i in range(d):
                        acc = np.float32(0.0)
                        for j in range(n):
                            acc += gl[j] * Xn[j, i]
                        g_e[i] = acc
                        g_w2[i] = acc
                    GX = np.empty((n, d), dtype=np.float32)
                    for j in range(n):
                        for i in range(d):
                            GX[j, i] = gl[j] * v[i]
                    g_w1i = np.empty((0, 0), dtype=np.float32)
                else:
                    M = A[:n]
                    g_w1i = np.dot(M.T, Xn)  # [h, d]
                    GX = np.dot(M, w1i)  # [n, d]
                    for i in range(d):
                        acc = np.float32(0.0)
                        for k in range(h):
                            acc += w1u[k, i] * g_b1[k]
                        g_e[i] = acc
                # item rows: every gradient from the step's starting rows, then subtract
                two_a = np.float32(2.0 * alpha / (n * d))
                wd_n = wd_rows * inv_n  # L2 on the batch's rows, a mean over the batch like the loss
                bsc = np.float32(beta / (n * d))
                for j in range(n):
                    r = rows[j]
                    pr = p_slot[r] if has_personal else 0
                    for i in range(d):
                        gx = GX[j, i]
                        gc = gx
                        if has_personal:
                            diff = Pb[j, i] - Cb[j, i]
                            gc += two_a * diff
                            P[pr, i] -= lr_i32 * (gx - two_a * diff + (wd_n * Pb[j, i] if dot else np.float32(0.0)))
                        cv = Cb[j, i]
                        if dot:
                            gc += wd_n * cv
                        if cv > 0.0:
                            gc += bsc
                        elif cv < 0.0:
                            gc -= bsc
                        C[r, i] -= lr_i32 * gc
                # head and embedding: p <- p (1 - lr wd) - lr grad
                if dot:  # the user vector's two parts and the bias, at the embedding lr
                    for i in range(d):
                        out[i] = out[i] * decay_u - lr_u32 * g_w2[i]
                        if train_embedding:
                            e[i] = e[i] * decay_u - lr_u32 * g_e[i]
                    b2[c] = b2[c] - lr_u32 * g_b2
                    continue
                for k in range(h):
                    gb = g_b1[k]
                    for i in range(d):
                        w1u[k, i] = w1u[k, i] * decay - lr_n32 * (gb * e[i])
                        w1i[k, i] = w1i[k, i] * decay - lr_n32 * g_w1i[k, i]
                    bias1[k] = bias1[k] * decay - lr_n32 * gb
                    out[k] = out[k] * decay - lr_n32 * g_w2[k]
                b2[c] = b2[c] * decay - lr_n32 * g_b2
                if train_embedding:
                    for i in range(d):
                        e[i] = e[i] * decay - lr_n32 * g_e[i]
        for r in range(row_ptr[c], row_ptr[c + 1]):
            for i in range(d):
                C[r, i] -= shared_table[row_items[r], i]


@njit(cache=True, nogil=True)
def _splitmix(x):
    x = x + _GOLD
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True)
def shuffle_orders(clients, counts, epochs, seed, shift, out):
    """:func:`gfmfr_secure.client.plan.epoch_orders` client by client (same result).

    Each client's samples are ordered by ``hash(seed, client, epoch, position) >> shift``
    with ties in position order: what the global stable sort of the packed
    ``(client, key >> shift)`` gives, without sorting the whole cohort.
    ``out`` : int64 [epochs, M], written.
    """
    start = 0
    seed_u = np.uint64(seed)
    for c in range(clients.size):
        n = counts[c]
        if n == 0:
            continue
        client_u = np.uint64(clients[c])
        keys = np.empty(n, dtype=np.uint64)
        for epoch in range(epochs):
            base = _splitmix(_splitmix(_splitmix(np.uint64(0) ^ seed_u) ^ client_u) ^ np.uint64(epoch))
            for j in range(n):
                keys[j] = _splitmix(base ^ np.uint64(j)) >> np.uint64(shift)
            order = np.argsort(keys, kind="mergesort")
            for j in range(n):
                out[epoch, start + j] = start + order[j]
        start += n
