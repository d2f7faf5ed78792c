"""The server's fusion training for the ``moe`` operator as one compiled loop (Numba).

:func:`train_moe_sgd` runs every epoch and batch of
:func:`~gfmfr_secure.server.fusion_training.train_fusion` for a
:class:`~gfmfr_secure.server.fusion.GroupFusion` whose operator is ``moe`` and whose
item tokens come from fixed feature matrices, with plain SGD: the same batches, the
same hand-derived gradients as :meth:`GroupFusion.grid_mse_grads`, the same update
``p <- p (1 - lr wd) - lr g``. Matrix products go to BLAS (``np.dot``); the per-pair
work of the group x item grid (ReLU, router softmax, mixing, their backward) is fused
loops. Nothing is dispatched per operation, which is what dominates the eager step
(about 200 small kernels), and no C++ compiler is needed.

Shapes: ``R`` active groups, ``C`` items in a batch, ``P = R C`` pairs, ``d`` the latent
size, ``H = 2d`` the mlp expert's width, ``h`` the router's width, ``M`` item
modalities (``k = M + 1`` tokens per pair). Pair ``p = g C + i``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["train_moe_sgd"]

#: LLVM may reassociate sums (vectorised reductions), fuse multiply-adds and ignore the
#: sign of zero; NaN and inf keep their IEEE meaning, so a diverging loss is still seen.
#: About 5% faster than strict IEEE order; results differ at rounding level.
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, nogil=True, fastmath=_FAST)
def _cols(w, lo, hi):
    """Contiguous copy of the column block ``w[:, lo:hi]``."""
    return np.ascontiguousarray(w[:, lo:hi])


@njit(cache=True, nogil=True, fastmath=_FAST)
def _sgd(p, g, decay, lr):
    """``p <- p * decay - lr * g`` for arrays of equal shape (flattened)."""
    pf = p.reshape(-1)
    gf = g.reshape(-1)
    for j in range(pf.size):
        pf[j] = pf[j] * decay - lr * gf[j]


@njit(cache=True, nogil=True, fastmath=_FAST)
def _sgd_cols(p, lo, g, decay, lr):
    """SGD on the column block ``p[:, lo:lo + g.shape[1]]``."""
    for r in range(g.shape[0]):
        for c in range(g.shape[1]):
            p[r, lo + c] = p[r, lo + c] * decay - lr * g[r, c]


@njit(cache=True, nogil=True, fastmath=_FAST)
def _sigmoid_rows(z):
    for r in range(z.shape[0]):
        for c in range(z.shape[1]):
            z[r, c] = 1.0 / (1.0 + math.exp(-z[r, c]))


@njit(cache=True, nogil=True, fastmath=_FAST)
def _add_bias(z, b):
    for r in range(z.shape[0]):
        for c in range(z.shape[1]):
            z[r, c] += b[c]


@njit(cache=True, nogil=True, fastmath=_FAST)
def _colsum(z):
    out = np.zeros(z.shape[1], dtype=z.dtype)
    for r in range(z.shape[0]):
        for c in range(z.shape[1]):
            out[c] += z[r, c]
    return out


@njit(cache=True, nogil=True, fastmath=_FAST)
def _grid_sums(x, R, C):
    """Row and column sums ``[R, n]``, ``[C, n]`` of a grid matrix ``x [R C, n]``."""
    rows = np.zeros((R, x.shape[1]), dtype=x.dtype)
    cols = np.zeros((C, x.shape[1]), dtype=x.dtype)
    for g in range(R):
        for i in range(C):
            p = g * C + i
            for c in range(x.shape[1]):
                rows[g, c] += x[p, c]
                cols[i, c] += x[p, c]
    return rows, cols


@njit(cache=True, nogil=True, fastmath=_FAST)
def train_moe_sgd(
    perms,
    items_per_batch,
    active,
    targets,
    emb,
    Wg,
    bg,
    feats,
    Wp,
    bp,
    W1,
    b1,
    W2,
    b2,
    Wgate,
    bgate,
    Wf,
    bf,
    Wr1,
    br1,
    Wr2,
    br2,
    lr,
    weight_decay,
    losses,
):
    """Train in place; ``losses[e]`` receives epoch ``e``'s mean batch loss (pair-weighted).

    Parameters
    ----------
    perms : int64 [epochs, I] each epoch's item order.
    items_per_batch : items per step (every active group sees each of them).
    active : int64 [R] the groups with members; targets : float32 [R, I, d] their tables.
    emb : [G, E] group embedding; Wg [d, E], bg [d] its projection.
    feats : tuple of M float32 [I, D_m] item features; Wp, bp : tuples of their
        projections [d, D_m], [d].
    W1 [H, k d], b1 [H], W2 [d, H], b2 [d] : the mlp expert.
    Wgate, bgate : tuples of k gates [d, d], [d]; Wf [d, k d], bf [d] : the gate expert.
    Wr1 [h, 3 d], br1 [h], Wr2 [3, h], br2 [3] : the router.
    lr, weight_decay : plain SGD.
    losses : float64 [epochs], written.
    """
    n_epochs, n_items = perms.shape
    R = active.size
    d = Wg.shape[0]
    H = W1.shape[0]
    h = Wr1.shape[0]
    M = len(feats)
    decay = np.float32(1.0 - lr * weight_decay)
    lr32 = np.float32(lr)
    f0 = np.float32(0.0)
    for epoch in range(n_epochs):
        total = 0.0
        for start in range(0, n_items, items_per_batch):
            C = min(items_per_batch, n_items - start)
            P = R * C
            items = perms[epoch, start : start + C]
            # ---------------- forward: tokens
            ea = np.empty((R, emb.shape[1]), dtype=np.float32)
            for g in range(R):
                ea[g] = emb[active[g]]
            tg = np.dot(ea, Wg.T)
            _add_bias(tg, bg)
            xbs = []
            tcs = []
            for m in range(M):
                x = feats[m]
                xb = np.empty((C, x.shape[1]), dtype=np.float32)
                for i in range(C):
                    xb[i] = x[items[i]]
                tc = np.dot(xb, Wp[m].T)
                _add_bias(tc, bp[m])
                xbs.append(xb)
                tcs.append(tc)
            # sum expert: r0 [R, d], c0 [C, d]
            r0 = tg
            c0 = tcs[0].copy()
            for m in range(1, M):
                c0 += tcs[m]
            # mlp expert: hid [P, H], out1 [P, d]
            W1b = [_cols(W1, j * d, (j + 1) * d) for j in range(M + 1)]
            Hr = np.dot(tg, W1b[0].T)
            _add_bias(Hr, b1)
            Hc = np.dot(tcs[0], W1b[1].T)
            for m in range(1, M):
                Hc += np.dot(tcs[m], W1b[m + 1].T)
            hid = np.empty((P, H), dtype=np.float32)
            for g in range(R):
                for i in range(C):
                    p = g * C + i
                    for c in range(H):
                        v = Hr[g, c] + Hc[i, c]
                        hid[p, c] = v if v > 0.0 else f0
            out1 = np.dot(hid, W2.T)
            _add_bias(out1, b2)
            # gate expert: r2 [R, d] (with its bias), c2 [C, d]
            Wfb = [_cols(Wf, j * d, (j + 1) * d) for j in range(M + 1)]
            s0 = np.dot(tg, Wgate[0].T)
            _add_bias(s0, bgate[0])
            _sigmoid_rows(s0)
            r2 = np.dot(s0, Wfb[0].T)
            _add_bias(r2, bf)
            ss = []
            c2 = np.zeros((C, d), dtype=np.float32)
            for m in range(M):
                s = np.dot(tcs[m], Wgate[m + 1].T)
                _add_bias(s, bgate[m + 1])
                _sigmoid_rows(s)
                c2 += np.dot(s, Wfb[m + 1].T)
                ss.append(s)
            # router
            Wr0 = _cols(Wr1, 0, d)
            Wr_1 = _cols(Wr1, d, 2 * d)
            Wr_2 = _cols(Wr1, 2 * d, 3 * d)
            Ar = np.dot(r0, Wr0.T) + np.dot(r2, Wr_2.T)
            _add_bias(Ar, br1)
            Ac = np.dot(c0, Wr0.T) + np.dot(c2, Wr_2.T)
            act = np.dot(out1, Wr_1.T)  # [P, h], pre-activation until the ReLU below
            wts = np.empty((P, 3), dtype=np.float32)
            dout = np.empty((P, d), dtype=np.float32)
            loss = 0.0
            scale = np.float32(2.0 / (P * d))
            for g in range(R):
                for i in range(C):
                    p = g * C + i
                    l0 = br2[0]
                    l1 = br2[1]
                    l2 = br2[2]
                    for c in range(h):
                        v = act[p, c] + Ar[g, c] + Ac[i, c]
                        v = v if v > 0.0 else f0
                        act[p, c] = v
                        l0 += Wr2[0, c] * v
                        l1 += Wr2[1, c] * v
                        l2 += Wr2[2, c] * v
                    top = max(l0, max(l1, l2))
                    e0 = math.exp(l0 - top)
                    e1 = math.exp(l1 - top)
                    e2 = math.exp(l2 - top)
                    den = e0 + e1 + e2
                    w0 = np.float32(e0 / den)
                    w1 = np.float32(e1 / den)
                    w2 = np.float32(e2 / den)
                    wts[p, 0] = w0
                    wts[p, 1] = w1
                    wts[p, 2] = w2
                    row = items[i]
                    for c in range(d):
                        o = w0 * (r0[g, c] + c0[i, c]) + w1 * out1[p, c] + w2 * (r2[g, c] + c2[i, c])
                        diff = o - targets[g, row, c]
                        loss += diff * diff
                        dout[p, c] = scale * diff
            loss /= P * d
            total += loss * C
            # ---------------- backward: router and mixing
            dpre = np.empty((P, h), dtype=np.float32)
            g_Wr2 = np.zeros((3, h), dtype=np.float32)
            g_br2 = np.zeros(3, dtype=np.float32)
            dO1 = np.empty((P, d), dtype=np.float32)
            wd0_r = np.zeros((R, d), dtype=np.float32)
            wd0_c = np.zeros((C, d), dtype=np.float32)
            wd2_r = np.zeros((R, d), dtype=np.float32)
            wd2_c = np.zeros((C, d), dtype=np.float32)
            for g in range(R):
                for i in range(C):
                    p = g * C + i
                    dw0 = f0
                    dw1 = f0
                    dw2 = f0
                    for c in range(d):
                        dv = dout[p, c]
                        dw0 += (r0[g, c] + c0[i, c]) * dv
                        dw1 += out1[p, c] * dv
                        dw2 += (r2[g, c] + c2[i, c]) * dv
                    w0 = wts[p, 0]
                    w1 = wts[p, 1]
                    w2 = wts[p, 2]
                    mean = w0 * dw0 + w1 * dw1 + w2 * dw2
                    dl0 = w0 * (dw0 - mean)
                    dl1 = w1 * (dw1 - mean)
                    dl2 = w2 * (dw2 - mean)
                    g_br2[0] += dl0
                    g_br2[1] += dl1
                    g_br2[2] += dl2
                    for c in range(h):
                        a = act[p, c]
                        g_Wr2[0, c] += dl0 * a
                        g_Wr2[1, c] += dl1 * a
                        g_Wr2[2, c] += dl2 * a
                        dv = dl0 * Wr2[0, c] + dl1 * Wr2[1, c] + dl2 * Wr2[2, c]
                        dpre[p, c] = dv if a > 0.0 else f0
                    for c in range(d):
                        dv = dout[p, c]
                        dO1[p, c] = w1 * dv
                        wd0_r[g, c] += w0 * dv
                        wd0_c[i, c] += w0 * dv
                        wd2_r[g, c] += w2 * dv
                        wd2_c[i, c] += w2 * dv
            dpre_r, dpre_c = _grid_sums(dpre, R, C)
            g_br1 = _colsum(dpre_r)
            g_Wr0 = np.dot(dpre_r.T, r0) + np.dot(dpre_c.T, c0)
            g_Wr_1 = np.dot(dpre.T, out1)
            g_Wr_2 = np.dot(dpre_r.T, r2) + np.dot(dpre_c.T, c2)
            dO1 += np.dot(dpre, Wr_1)
            d_r0 = wd0_r + np.dot(dpre_r, Wr0)
            d_c0 = wd0_c + np.dot(dpre_c, Wr0)
            d_r2 = wd2_r + np.dot(dpre_r, Wr_2)
            d_c2 = wd2_c + np.dot(dpre_c, Wr_2)
            # ---------------- mlp expert
            g_W2 = np.dot(dO1.T, hid)
            g_b2 = _colsum(dO1)
            dhid = np.dot(dO1, W2)
            for p in range(P):
                for c in range(H):
                    if not hid[p, c] > 0.0:
                        dhid[p, c] = f0
            dz_r, dz_c = _grid_sums(dhid, R, C)
            g_b1 = _colsum(dz_r)
            g_W1 = [np.dot(dz_r.T, tg)]
            for m in range(M):
                g_W1.append(np.dot(dz_c.T, tcs[m]))
            d_tg = np.dot(dz_r, W1b[0]) + d_r0
            d_tcs = []
            for m in range(M):
                d_tcs.append(np.dot(dz_c, W1b[m + 1]) + d_c0)
            # ---------------- gate expert
            g_Wf = [np.dot(d_r2.T, s0)]
            g_bf = _colsum(d_r2)
            dz0 = np.dot(d_r2, Wfb[0])
            for r in range(R):
                for c in range(d):
                    v = s0[r, c]
                    dz0[r, c] *= v * (1.0 - v)
            g_Wgate = [np.dot(dz0.T, tg)]
            g_bgate = [_colsum(dz0)]
            d_tg += np.dot(dz0, Wgate[0])
            for m in range(M):
                s = ss[m]
                g_Wf.append(np.dot(d_c2.T, s))
                dzm = np.dot(d_c2, Wfb[m + 1])
                for r in range(C):
                    for c in range(d):
                        v = s[r, c]
                        dzm[r, c] *= v * (1.0 - v)
                g_Wgate.append(np.dot(dzm.T, tcs[m]))
                g_bgate.append(_colsum(dzm))
                d_tcs[m] += np.dot(dzm, Wgate[m + 1])
            # ---------------- projections
            g_Wg = np.dot(d_tg.T, ea)
            g_bg = _colsum(d_tg)
            g_emb = np.dot(d_tg, Wg)
            g_Wp = []
            g_bp = []
            for m in range(M):
                g_Wp.append(np.dot(d_tcs[m].T, xbs[m]))
                g_bp.append(_colsum(d_tcs[m]))
            # ---------------- SGD on every parameter (the group embedding's inactive rows decay only)
            for g in range(emb.shape[0]):
                for c in range(emb.shape[1]):
                    emb[g, c] *= decay
            for g in range(R):
                for c in range(emb.shape[1]):
                    emb[active[g], c] -= lr32 * g_emb[g, c]
            _sgd(Wg, g_Wg, decay, lr32)
            _sgd(bg, g_bg, decay, lr32)
            for m in range(M):
                _sgd(Wp[m], g_Wp[m], decay, lr32)
                _sgd(bp[m], g_bp[m], decay, lr32)
            for j in range(M + 1):
                _sgd_cols(W1, j * d, g_W1[j], decay, lr32)
            _sgd(b1, g_b1, decay, lr32)
            _sgd(W2, g_W2, decay, lr32)
            _sgd(b2, g_b2, decay, lr32)
            for j in range(M + 1):
                _sgd(Wgate[j], g_Wgate[j], decay, lr32)
                _sgd(bgate[j], g_bgate[j], decay, lr32)
                _sgd_cols(Wf, j * d, g_Wf[j], decay, lr32)
            _sgd(bf, g_bf, decay, lr32)
            _sgd_cols(Wr1, 0, g_Wr0, decay, lr32)
            _sgd_cols(Wr1, d, g_Wr_1, decay, lr32)
            _sgd_cols(Wr1, 2 * d, g_Wr_2, decay, lr32)
            _sgd(br1, g_br1, decay, lr32)
            _sgd(Wr2, g_Wr2, decay, lr32)
            _sgd(br2, g_br2, decay, lr32)
        losses[epoch] = total / n_items
