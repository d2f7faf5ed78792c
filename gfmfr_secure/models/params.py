"""The shared parameters of the recommender and their initialisation."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

__all__ = ["HEAD_KEYS", "SharedParams", "flatten_heads", "head_size", "init_shared_params", "unflatten_heads"]

HEAD_KEYS = ("w1_user", "w1_item", "b1", "w2", "b2")


@dataclass
class SharedParams:
    """Parameters the server holds and broadcasts.

    Attributes
    ----------
    item_table : [I, d] shared item table ``C``.
    w1_user : [h, d] user half of the head's first layer.
    w1_item : [h, d] item half of the head's first layer.
    b1 : [h] first-layer bias.
    w2 : [h] output-layer weight.
    b2 : [1] output-layer bias.
    """

    item_table: torch.Tensor
    w1_user: torch.Tensor
    w1_item: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def clone(self) -> SharedParams:
        return SharedParams(**{f.name: getattr(self, f.name).detach().clone() for f in fields(self)})

    def head_flat(self) -> torch.Tensor:
        """The head as one vector [H] in the order ``w1_user, w1_item, b1, w2, b2``."""
        return torch.cat([getattr(self, k).reshape(-1) for k in HEAD_KEYS])

    def set_head_flat_(self, flat: torch.Tensor) -> None:
        """Overwrite the head from a vector produced by :meth:`head_flat`."""
        offset = 0
        for k in HEAD_KEYS:
            t = getattr(self, k)
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
        if offset != flat.numel():
            raise ValueError(f"head vector has {flat.numel()} entries, expected {offset}")

    @property
    def latent_dim(self) -> int:
        return int(self.item_table.shape[1])

    @property
    def n_items(self) -> int:
        return int(self.item_table.shape[0])


def head_size(latent_dim: int, hidden: int | None = None) -> int:
    """Number of entries of the flattened head for latent size d and hidden size h (= d)."""
    h = latent_dim if hidden is None else hidden
    return 2 * h * latent_dim + 2 * h + 1


def init_shared_params(
    n_items: int,
    latent_dim: int,
    generator: torch.Generator,
    item_std: float = 0.01,
    *,
    scorer: str = "mlp",
    user_std: float = 0.1,
) -> SharedParams:
    """Initial shared parameters.

    ``mlp`` scorer, as the GFMFR authors initialise it: first layer Kaiming-normal
    (fan-in ``2d``, ReLU gain); output layer Xavier-uniform; biases zero; item table
    ``N(0, item_std^2)``. ``dot`` scorer: the output layer ``w2`` is the shared part of
    the user vector, ``N(0, user_std^2)``; the first layer, unused, is zero (and stays
    zero: it receives no gradient), so every backbone keeps one head layout.
    """
    if scorer not in ("mlp", "dot"):
        raise ValueError(f"unknown scorer {scorer!r}; known: dot, mlp")
    if n_items < 1 or latent_dim < 1:
        raise ValueError(f"n_items and latent_dim must be positive, got {n_items}, {latent_dim}")
    d = latent_dim
    std1 = math.sqrt(2.0) / math.sqrt(2 * d)
    w1 = torch.randn(d, 2 * d, generator=generator) * std1
    bound = math.sqrt(6.0 / (d + 1))
    w2 = (torch.rand(d, generator=generator) * 2 - 1) * bound
    table = torch.randn(n_items, d, generator=generator) * item_std
    if scorer == "dot":
        w1 = torch.zeros_like(w1)
        w2 = torch.randn(d, generator=generator) * user_std
    return SharedParams(
        item_table=table,
        w1_user=w1[:, :d].contiguous(),
        w1_item=w1[:, d:].contiguous(),
        b1=torch.zeros(d),
        w2=w2,
        b2=torch.zeros(1),
    )


def flatten_heads(w1u: torch.Tensor, w1i: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Stacked heads [n, h, d] x2, [n, h], [n, h], [n] -> [n, H] (order of ``SharedParams.head_flat``)."""
    n = w1u.shape[0]
    return torch.cat([w1u.reshape(n, -1), w1i.reshape(n, -1), b1, w2, b2.reshape(n, 1)], dim=1)


def unflatten_heads(flat: torch.Tensor, latent_dim: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`flatten_heads` for hidden size = latent size."""
    n, d = flat.shape[0], latent_dim
    hd = d * d
    w1u = flat[:, :hd].reshape(n, d, d)
    w1i = flat[:, hd : 2 * hd].reshape(n, d, d)
    b1 = flat[:, 2 * hd : 2 * hd + d]
    w2 = flat[:, 2 * hd + d : 2 * hd + 2 * d]
    b2 = flat[:, 2 * hd + 2 * d]
    if flat.shape[1] != 2 * hd + 2 * d + 1:
        raise ValueError(f"head vectors have {flat.shape[1]} entries, expected {2 * hd + 2 * d + 1}")
    return w1u, w1i, b1, w2, b2
