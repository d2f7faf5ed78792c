"""Clipping and Gaussian noise for released sums: pure functions.

Each client's whole update is clipped to L2 norm ``clip`` (C); the released sum
of clipped updates then gets Gaussian noise of std ``noise_multiplier * clip``
(sigma * C), added either centrally (:func:`add_central_noise`) or as shares
by the clients (:func:`distributed_noise_std`). Noise is drawn only from the
``torch.Generator`` passed in, never from a global generator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gfmfr_secure.errors import ConfigError, DataError

__all__ = [
    "adaptive_clip_step",
    "add_central_noise",
    "clip_sparse_updates",
    "clipped_count_query",
    "clip_updates",
    "clip_updates_per_tensor",
    "distributed_noise_std",
    "gaussian_noise_like",
    "noisy_unclipped_fraction",
    "split_noise_multiplier",
]


def _check_clip(clip: float) -> float:
    value = float(clip)
    if math.isnan(value) or value <= 0.0:
        raise ConfigError(f"clip must be > 0 (inf allowed, meaning no clipping), got {clip!r}")
    return value


def _check_sigma(noise_multiplier: float) -> float:
    value = float(noise_multiplier)
    if not (math.isfinite(value) and value >= 0.0):
        raise ConfigError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    return value


def _noise_std(noise_multiplier: float, clip: float) -> float:
    """``sigma * C``, with ``0`` when sigma is 0 (also for ``C = inf``)."""
    sigma = _check_sigma(noise_multiplier)
    c = _check_clip(clip)
    if sigma == 0.0:
        return 0.0
    if math.isinf(c):
        raise ConfigError(
            f"clip=inf with noise_multiplier={sigma!r} > 0 gives infinite noise; "
            "set a finite clip or noise_multiplier=0"
        )
    return sigma * c


def clip_updates(updates: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """Scale each row down to L2 norm at most ``clip`` (flat clipping).

    Row ``i`` is multiplied by ``min(1, clip / ||u_i||)``: rows with norm
    ``<= clip`` are returned unchanged, longer rows keep their direction and
    end with norm ``clip`` up to floating-point rounding (relative ~1e-7 in
    float32).

    Parameters
    ----------
    updates : [n, P] one flattened update per client.
    clip : C > 0; ``inf`` disables clipping.

    Returns
    -------
    clipped : [n, P] same dtype and device as ``updates``.
    norms : [n] L2 norms of the rows before clipping.

    Raises
    ------
    ConfigError
        If ``updates`` is not 2-D or ``clip`` is not > 0.
    DataError
        If an update holds NaN or infinite values.
    """
    c = _check_clip(clip)
    if updates.dim() != 2:
        raise ConfigError(f"updates must be 2-D [n, P], got shape {tuple(updates.shape)}")
    norms = torch.linalg.vector_norm(updates, ord=2, dim=1)
    if not bool(torch.isfinite(norms).all()):
        bad = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
        raise DataError(f"updates: rows {bad[:10]} hold NaN or infinite values")
    if math.isinf(c):
        return updates.clone(), norms
    over = norms > c
    scale = torch.where(over, c / torch.where(over, norms, torch.ones_like(norms)), 1.0)
    clipped = updates * scale.to(updates.dtype).unsqueeze(1)
    return clipped, norms


def clip_updates_per_tensor(parts: list[Tensor], clip: float) -> tuple[list[Tensor], Tensor]:
    """Clip each of ``K`` parts separately to ``clip / sqrt(K)``.

    Per-tensor (per-layer) clipping: with every part's row norm at most
    ``C / sqrt(K)``, the concatenated row has norm at most
    ``sqrt(K * C**2 / K) = C``, so the total L2 sensitivity, and hence the
    accounting, is the same as for flat clipping with ``C``.

    Parameters
    ----------
    parts : K tensors, each [n, P_k], sharing the first dimension n.
    clip : C > 0 for the whole concatenated row; ``inf`` disables clipping.

    Returns
    -------
    clipped : K tensors [n, P_k].
    norms : [n, K] L2 norm of each row of each part before clipping.

    Raises
    ------
    ConfigError
        If ``parts`` is empty, a part is not 2-D or the row counts differ.
    """
    c = _check_clip(clip)
    if len(parts) == 0:
        raise ConfigError("parts must hold at least one tensor [n, P_k]")
    rows = {int(p.shape[0]) if p.dim() == 2 else -1 for p in parts}
    if len(rows) != 1 or -1 in rows:
        shapes = [tuple(p.shape) for p in parts]
        raise ConfigError(f"parts must all be 2-D with the same n, got shapes {shapes}")
    per_part = c / math.sqrt(len(parts))
    results = [clip_updates(p, per_part) for p in parts]
    return [r[0] for r in results], torch.stack([r[1] for r in results], dim=1)


def gaussian_noise_like(t: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """Gaussian noise N(0, std^2) with the shape, dtype and device of ``t``.

    Parameters
    ----------
    t : [*] template tensor (its values are not read).
    std : standard deviation, finite and >= 0; ``0`` gives zeros.
    generator : the only source of randomness (must live on ``t``'s device).

    Returns
    -------
    Tensor
        [*] like ``t``.
    """
    s = float(std)
    if not (math.isfinite(s) and s >= 0.0):
        raise ConfigError(f"std must be finite and >= 0, got {std!r}")
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if s == 0.0:
        return torch.zeros_like(t)
    noise = torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)
    return noise * s


def add_central_noise(
    total: Tensor, noise_multiplier: float, clip: float, generator: torch.Generator
) -> Tensor:
    """Release ``total`` plus Gaussian noise of std ``noise_multiplier * clip``.

    Parameters
    ----------
    total : [*] sum of updates each clipped to L2 norm ``clip``.
    noise_multiplier : sigma >= 0; with ``0`` the result equals ``total``.
    clip : C > 0; ``inf`` is allowed only with sigma = 0.
    generator : source of the noise.

    Returns
    -------
    Tensor
        [*] a new tensor, ``total + N(0, (sigma C)^2 I)``.
    """
    std = _noise_std(noise_multiplier, clip)
    return total + gaussian_noise_like(total, std, generator)


def distributed_noise_std(noise_multiplier: float, clip: float, n_honest_min: int) -> float:
    """Std each client adds so that any ``n_honest_min`` honest shares carry sigma * C.

    With ``m = n_honest_min`` honest clients each adding independent
    N(0, (sigma C)^2 / m) noise, the honest part of the sum has variance
    ``(sigma C)^2``: the full central noise, whatever the others add.

    Parameters
    ----------
    noise_multiplier : sigma >= 0.
    clip : C > 0 (``inf`` only with sigma = 0).
    n_honest_min : m >= 1, the fewest honest clients assumed to report.

    Returns
    -------
    float
        ``sigma * C / sqrt(m)``.
    """
    if isinstance(n_honest_min, bool) or not isinstance(n_honest_min, int) or n_honest_min < 1:
        raise ConfigError(f"n_honest_min must be an integer >= 1, got {n_honest_min!r}")
    return _noise_std(noise_multiplier, clip) / math.sqrt(n_honest_min)


def clip_sparse_updates(
    row_owner: Tensor,
    item_delta: Tensor,
    head_delta: Tensor | None,
    n_clients: int,
    clip: float,
    *,
    per_tensor: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Clip each client's whole update, held as sparse item rows plus a head vector.

    Client ``i``'s update is the concatenation of its item-table rows
    ``item_delta[row_owner == i]`` and ``head_delta[i]``; rows it did not upload
    are zero and do not change the norm. Flat clipping scales the whole update by
    ``min(1, C / ||u_i||)``; per-tensor clipping scales the item part and the
    head part separately to ``C / sqrt(2)`` each (the same total bound C).

    Parameters
    ----------
    row_owner : int64 [R] cohort position owning each row.
    item_delta : [R, d] item-table row updates.
    head_delta : [n, H] head updates, or None (private heads: item rows only).
    n_clients : n.
    clip : C > 0; ``inf`` returns the inputs unchanged (the same tensor objects).
    per_tensor : per-tensor instead of flat clipping.

    Returns
    -------
    item_delta : [R, d] clipped rows.
    head_delta : [n, H] clipped heads, or None.
    norms : [n] L2 norm of each client's whole update before clipping.

    Raises
    ------
    DataError
        If an update holds NaN or infinite values.
    """
    c = _check_clip(clip)
    item_sq = torch.zeros(n_clients, dtype=torch.float64)
    item_sq.index_add_(0, row_owner, item_delta.double().square().sum(1))
    head_sq = head_delta.double().square().sum(1) if head_delta is not None else torch.zeros(n_clients, dtype=torch.float64)
    norms = (item_sq + head_sq).sqrt()
    if not bool(torch.isfinite(norms).all()):
        bad = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
        raise DataError(f"client updates at cohort positions {bad[:10]} hold NaN or infinite values")
    if math.isinf(c):
        return item_delta, head_delta, norms.float()

    def factor(norm: Tensor, bound: float) -> Tensor:
        return torch.where(norm > bound, bound / norm.clamp(min=1e-300), torch.ones_like(norm))

    if per_tensor and head_delta is not None:
        bound = c / math.sqrt(2.0)
        f_item, f_head = factor(item_sq.sqrt(), bound), factor(head_sq.sqrt(), bound)
    else:
        f_item = f_head = factor(norms, c)
    item_out = item_delta * f_item.to(item_delta.dtype)[row_owner].unsqueeze(1)
    head_out = None if head_delta is None else head_delta * f_head.to(head_delta.dtype).unsqueeze(1)
    return item_out, head_out, norms.float()


def split_noise_multiplier(noise_multiplier: float, count_stddev: float, expected_clients: float) -> float:
    """Noise multiplier left for the update when adaptive clipping also noises a count.

    Andrew et al. (2021), Theorem 1: releasing the sum of updates with multiplier
    ``z_Delta`` and the count of unclipped clients (sensitivity 1/2 after centring)
    with std ``sigma_b`` is, for accounting, one Gaussian mechanism with multiplier
    ``z = (z_Delta^-2 + (2 sigma_b)^-2)^-1/2``. So ``z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2``.

    Parameters
    ----------
    noise_multiplier : z, the total multiplier that is accounted, > 0.
    count_stddev : sigma_b, std of the count noise; 0 means ``expected_clients / 20``.
    expected_clients : expected cohort size (for the default sigma_b).

    Raises
    ------
    ConfigError
        If ``2 sigma_b <= z``: the count would take more than the whole budget.
    """
    z = _check_sigma(noise_multiplier)
    sigma_b = float(count_stddev) if count_stddev > 0 else float(expected_clients) / 20.0
    if z == 0.0:
        return 0.0
    if 2.0 * sigma_b <= z:
        raise ConfigError(
            f"adaptive clipping: the count noise std {sigma_b:g} is too small for noise_multiplier {z:g} "
            f"(needs 2 * sigma_b > z); raise privacy.clip_count_stddev"
        )
    return (z ** -2 - (2.0 * sigma_b) ** -2) ** -0.5


def clipped_count_query(norms: Tensor, clip: float) -> float:
    """The count adaptive clipping releases, before noise: ``sum_i (b_i - 1/2)``.

    ``b_i = 1`` when client i's update norm is at most C. Each client contributes
    ``b_i - 1/2 = +-1/2`` (Andrew et al. 2021, section 3), so adding or removing one
    client moves the query by exactly 1/2: the sensitivity :func:`split_noise_multiplier`
    assumes. (The unshifted count ``sum_i b_i`` would move by up to 1.)

    Parameters
    ----------
    norms : [n] update norms before clipping.
    clip : C.
    """
    b = (norms <= float(clip)).to(torch.float64)
    return float((b - 0.5).sum())


def noisy_unclipped_fraction(norms: Tensor, clip: float, count_noise: float, expected_clients: float) -> float:
    """Andrew et al. (2021): ``b~ = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2``.

    Parameters
    ----------
    norms : [n] update norms before clipping.
    clip : C.
    count_noise : the Gaussian draw N(0, sigma_b^2) added to :func:`clipped_count_query`.
    expected_clients : m, the expected cohort size (public under Poisson sampling).

    Returns
    -------
    float
        The noised fraction of clients whose norm was at most C (post-processing of the
        noised query).
    """
    m = max(float(expected_clients), 1.0)
    return (clipped_count_query(norms, clip) + float(count_noise)) / m + 0.5


def adaptive_clip_step(clip: float, noisy_unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """Geometric update of the clip towards a norm quantile (Andrew et al. 2021).

    ``C <- C * exp(-lr * (b - gamma))`` with ``b`` the noised fraction of clients
    whose update norm was at most C.
    """
    return float(clip) * math.exp(-float(lr) * (float(noisy_unclipped_fraction) - float(target_quantile)))
