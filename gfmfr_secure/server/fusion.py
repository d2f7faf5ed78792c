"""The group fusion module trained on the server each round (GFMFR).

For every (group, item) pair the module fuses ``k`` vectors of size ``d``:

- the group token: a learnable group embedding ``[G, E]`` projected ``E -> d``;
- one token per item modality: the item's text features ``[I, Dt]`` projected
  ``Dt -> d`` and/or its image features ``[I, Dv]`` projected ``Dv -> d``; with no
  modality at all, a learnable item-ID embedding ``[I, E]`` projected ``E -> d``
  takes their place (an ID-only server model), so the output still depends on
  the item.

So ``k = 3`` with text and image, and ``k = 2`` otherwise. The fusion operators
(:mod:`gfmfr_secure.server.operators`) are written for any ``k >= 2``.

It is trained (:func:`gfmfr_secure.server.fusion_training.train_fusion`) to regress each group's averaged shared
item table (``[G, I, d]``, MSE over all group x item pairs). Two paths compute
the same function:

- :meth:`GroupFusion.forward` for explicit ``(group, item)`` pairs;
- :meth:`GroupFusion.forward_grid` / :meth:`GroupFusion.forward_all` for the
  Cartesian product of groups and items. Every item's projections are computed
  once and shared by all groups, and each operator exploits the structure of the
  grid (additively separable operators such as ``sum`` and ``gate`` never touch
  a per-pair tensor before the final broadcast add). Training uses this path.

Item features are set with :meth:`GroupFusion.set_item_features` (or built in
with :meth:`GroupFusion.from_features`). They are non-persistent buffers: they
move with ``.to(...)`` but are not part of ``state_dict()``, which therefore
holds exactly the learned parameters that the server releases.

Initialisation draws only from the ``generator`` given to the constructor and
leaves the global torch RNG untouched: linear weights xavier-normal, biases
zero, embeddings normal with the xavier standard deviation
``sqrt(2 / (rows + cols))`` (the authors apply xavier-normal to embeddings too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gfmfr_secure.errors import ConfigError, DataError
from gfmfr_secure.server.operators import (
    OperatorOptions,
    _linear,
    get_fusion_operator,
)

__all__ = ["GroupFusion"]


def _as_feature_tensor(x: Tensor | np.ndarray, name: str, rows: int, cols: int) -> Tensor:
    """Validate item features ``[rows, cols]`` and return them as float32."""
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise DataError(f"{name} features must be 2-D [n_items, dim], got shape {tuple(t.shape)}")
    if t.shape[0] != rows:
        raise DataError(f"{name} features have {t.shape[0]} rows but n_items={rows}")
    if t.shape[1] != cols:
        raise DataError(f"{name} features have {t.shape[1]} columns but {name}_dim={cols}")
    if t.is_complex():
        raise DataError(f"{name} features must be real numbers, got dtype {t.dtype}")
    t = t.detach().to(torch.float32)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = torch.nonzero(bad.any(dim=1)).flatten()[:5].tolist()
        raise DataError(
            f"{name} features have {int(bad.sum())} NaN/inf entries (first item rows: {first})"
        )
    return t.contiguous()


def _check_dim(value: int | None, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


class GroupFusion(nn.Module):
    """Group-wise multimodal fusion: ``(group, item) -> [d]`` (GFMFR's server model).

    Parameters
    ----------
    n_groups : int
        ``G``.
    latent_dim : int
        ``d``, the size of the client item tables the module regresses.
    embedding_dim : int
        ``E``, size of the group embedding (and of the item-ID embedding when no
        modality is used).
    text_dim, image_dim : int or None
        ``Dt``, ``Dv``; None disables the modality.
    n_items : int
        ``I``.
    operator : str
        A key of :data:`FUSION_OPERATORS`: ``sum``, ``mlp``, ``gate``,
        ``attention`` or ``moe``.
    generator : torch.Generator or None
        Source of the initial weights. None uses a fresh generator seeded with 0,
        so construction is deterministic either way; the global RNG is never used.
    options : OperatorOptions or None
        Operator hyper-parameters (attention heads, router width).

    Attributes
    ----------
    modalities : tuple of str
        Token order: ``("group", "text", "image")``, ``("group", "text")``,
        ``("group", "image")`` or ``("group", "item_id")``.
    group_embedding : Parameter [G, E]
    item_embedding : Parameter [I, E] or None
        Only in the ID-only configuration.
    projections : ModuleDict
        One ``Linear(*, d)`` per entry of ``modalities``.
    fusion : FusionOperator

    Notes
    -----
    Item features are set after construction with :meth:`set_item_features`
    (or use :meth:`from_features`); they are stored as non-persistent buffers
    ``text_features [I, Dt]`` and ``image_features [I, Dv]``.
    """

    def __init__(
        self,
        n_groups: int,
        latent_dim: int,
        *,
        embedding_dim: int = 512,
        text_dim: int | None,
        image_dim: int | None,
        n_items: int,
        operator: str = "moe",
        generator: torch.Generator | None = None,
        options: OperatorOptions | None = None,
    ) -> None:
        super().__init__()
        _check_dim(n_groups, "n_groups")
        _check_dim(latent_dim, "latent_dim")
        _check_dim(embedding_dim, "embedding_dim")
        _check_dim(n_items, "n_items")
        _check_dim(text_dim, "text_dim", allow_none=True)
        _check_dim(image_dim, "image_dim", allow_none=True)
        factory = get_fusion_operator(operator)
        self.n_groups = n_groups
        self.latent_dim = latent_dim
        self.embedding_dim = embedding_dim
        self.n_items = n_items
        self.text_dim = text_dim
        self.image_dim = image_dim
        self.operator = operator

        in_dims: dict[str, int] = {"group": embedding_dim}
        if text_dim is not None:
            in_dims["text"] = text_dim
        if image_dim is not None:
            in_dims["image"] = image_dim
        if len(in_dims) == 1:
            in_dims["item_id"] = embedding_dim
        self.modalities: tuple[str, ...] = tuple(in_dims)

        self.group_embedding = nn.Parameter(torch.empty(n_groups, embedding_dim))
        self.item_embedding: nn.Parameter | None = None
        if "item_id" in in_dims:
            self.item_embedding = nn.Parameter(torch.empty(n_items, embedding_dim))
        self.projections = nn.ModuleDict(
            {m: _linear(dim, latent_dim) for m, dim in in_dims.items()}
        )
        self.fusion = factory(len(in_dims), latent_dim, options or OperatorOptions())
        self.register_buffer("text_features", None, persistent=False)
        self.register_buffer("image_features", None, persistent=False)
        self.reset_parameters(generator)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_features(
        cls,
        n_groups: int,
        latent_dim: int,
        *,
        text: Tensor | np.ndarray | None,
        image: Tensor | np.ndarray | None,
        n_items: int | None = None,
        embedding_dim: int = 512,
        operator: str = "moe",
        generator: torch.Generator | None = None,
        options: OperatorOptions | None = None,
    ) -> GroupFusion:
        """Build a module whose dims are read from the features, and set them.

        ``text`` ``[I, Dt]`` and ``image`` ``[I, Dv]`` (either may be None);
        ``n_items`` is required only when both are None.
        """
        shapes = [tuple(np.shape(f)) for f in (text, image) if f is not None]
        if n_items is None:
            if not shapes:
                raise ConfigError("n_items is required when neither text nor image is given")
            if len(shapes[0]) != 2:
                raise DataError(f"item features must be 2-D [n_items, dim], got shape {shapes[0]}")
            n_items = int(shapes[0][0])

        def dim_of(f: Tensor | np.ndarray | None, name: str) -> int | None:
            if f is None:
                return None
            shape = tuple(np.shape(f))
            if len(shape) != 2:
                raise DataError(f"{name} features must be 2-D [n_items, dim], got shape {shape}")
            return int(shape[1])

        module = cls(
            n_groups,
            latent_dim,
            embedding_dim=embedding_dim,
            text_dim=dim_of(text, "text"),
            image_dim=dim_of(image, "image"),
            n_items=n_items,
            operator=operator,
            generator=generator,
            options=options,
        )
        module.set_item_features(text=text, image=image)
        return module

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise every parameter from ``generator`` (None: a generator seeded with 0)."""
        gen = generator
        if gen is None:
            gen = torch.Generator()
            gen.manual_seed(0)
        for emb in (self.group_embedding, self.item_embedding):
            if emb is not None:
                std = math.sqrt(2.0 / (emb.shape[0] + emb.shape[1]))
                nn.init.normal_(emb, 0.0, std, generator=gen)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight, generator=gen)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_item_features(
        self, text: Tensor | np.ndarray | None = None, image: Tensor | np.ndarray | None = None
    ) -> None:
        """Store the item features as buffers (float32, on the module's device).

        Parameters
        ----------
        text : Tensor or ndarray, shape [I, Dt], or None
            Required exactly when the module was built with ``text_dim``.
        image : Tensor or ndarray, shape [I, Dv], or None
            Required exactly when the module was built with ``image_dim``.

        Raises
        ------
        DataError
            A feature matrix is missing, unexpected, of the wrong shape, or not finite.
        """
        device = self.group_embedding.device
        for name, value, dim in (("text", text, self.text_dim), ("image", image, self.image_dim)):
            if dim is None:
                if value is not None:
                    raise DataError(
                        f"{name} features given but the module was built with {name}_dim=None"
                    )
                continue
            if value is None:
                raise DataError(
                    f"the module was built with {name}_dim={dim} but no {name} features were given"
                )
            setattr(
                self,
                f"{name}_features",
                _as_feature_tensor(value, name, self.n_items, dim).to(device),
            )

    # ------------------------------------------------------------------ tokens

    def _item_source(self, name: str) -> Tensor:
        """The matrix that item modality ``name`` projects: ``[I, Dt]``, ``[I, Dv]`` or ``[I, E]``."""
        if name == "item_id" and self.item_embedding is not None:
            return self.item_embedding
        source = getattr(self, f"{name}_features")
        if source is None:
            raise DataError(
                f"item features for modality {name!r} are not set; "
                "call set_item_features(text=..., image=...) first"
            )
        return source

    def _item_tokens(self, item_idx: Tensor | None) -> list[Tensor]:
        """Projected item tokens, each ``[n, d]`` (``n = I`` when ``item_idx`` is None)."""
        rows = []
        for name in self.modalities[1:]:
            source = self._item_source(name)
            rows.append(source if item_idx is None else source.index_select(0, item_idx))
        return self._project_items(rows)

    def _project_items(self, rows: Sequence[Tensor]) -> list[Tensor]:
        """Project raw item rows (one matrix per item modality, in order) to ``[n, d]`` tokens."""
        return [self.projections[name](x) for name, x in zip(self.modalities[1:], rows)]

    def _group_tokens(self, group_idx: Tensor | None) -> list[Tensor]:
        emb = self.group_embedding
        rows = emb if group_idx is None else emb.index_select(0, group_idx)
        return [self.projections["group"](rows)]

    def _check_index(self, idx: Tensor, name: str, size: int) -> Tensor:
        if not isinstance(idx, Tensor):
            raise DataError(f"{name} must be a torch.LongTensor, got {type(idx).__name__}")
        if idx.dtype != torch.long:
            raise DataError(f"{name} must have dtype torch.long, got {idx.dtype}")
        if idx.ndim != 1:
            raise DataError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise DataError(
                f"{name} must lie in 0..{size - 1}, got range [{int(idx.min())}, {int(idx.max())}]"
            )
        return idx

    # ------------------------------------------------------------------ forward

    def forward(self, group_idx: Tensor, item_idx: Tensor) -> Tensor:
        """Fused vectors of explicit (group, item) pairs.

        Parameters
        ----------
        group_idx : LongTensor, shape [B]
        item_idx : LongTensor, shape [B]

        Returns
        -------
        Tensor, shape [B, d]
        """
        self._check_index(group_idx, "group_idx", self.n_groups)
        self._check_index(item_idx, "item_idx", self.n_items)
        if group_idx.shape != item_idx.shape:
            raise DataError(
                f"group_idx has shape {tuple(group_idx.shape)} but item_idx has {tuple(item_idx.shape)}"
            )
        return self.fusion(self._group_tokens(group_idx) + self._item_tokens(item_idx))

    def forward_grid(
        self, group_idx: Tensor | None = None, item_idx: Tensor | None = None
    ) -> Tensor:
        """Fused vectors of every (group, item) combination of the given ids.

        Each item's projections are computed once and shared by all groups.

        Parameters
        ----------
        group_idx : LongTensor, shape [G'], or None (all groups)
        item_idx : LongTensor, shape [I'], or None (all items)

        Returns
        -------
        Tensor, shape [G', I', d]
        """
        if group_idx is not None:
            self._check_index(group_idx, "group_idx", self.n_groups)
        if item_idx is not None:
            self._check_index(item_idx, "item_idx", self.n_items)
        return self._grid(group_idx, item_idx)

    def _grid(self, group_idx: Tensor | None, item_idx: Tensor | None) -> Tensor:
        """:meth:`forward_grid` without the index checks."""
        return self.fusion.forward_grid(self._group_tokens(group_idx), self._item_tokens(item_idx))

    def forward_all(self) -> Tensor:
        """Fused vectors of all groups x all items: ``[G, I, d]``."""
        return self.forward_grid(None, None)

    @torch.no_grad()
    def grid_mse_grads(
        self, group_idx: Tensor | None, item_idx: Tensor, raw_items: Sequence[Tensor], targets: Tensor
    ) -> tuple[Tensor, dict[nn.Parameter, Tensor]] | None:
        """MSE of the grid ``group_idx x item_idx`` against ``targets`` and its gradients, by hand.

        Parameters
        ----------
        group_idx : LongTensor [G'] or None (all groups)
        item_idx : LongTensor [b]
        raw_items : the rows ``item_idx`` of each item modality's input matrix ([b, D] each).
        targets : [G', b, d]

        Returns
        -------
        ``(loss, {parameter: gradient})`` with the gradient of every parameter, equal to
        what autograd gives for ``F.mse_loss(forward_grid(...), targets)``; None when the
        operator has no hand-derived backward.
        """
        emb = self.group_embedding if group_idx is None else self.group_embedding.index_select(0, group_idx)
        names = self.modalities[1:]
        proj_g = self.projections["group"]
        item_proj = [self.projections[name] for name in names]
        found = self.fusion.grid_vjp(self._group_tokens(group_idx), self._project_items(raw_items))
        if found is None:
            return None
        out, backward = found
        diff = out - targets
        loss = diff.square().mean()
        op_grads, d_rows, d_cols = backward(diff.mul_(2.0 / diff.numel()))
        grads: dict[nn.Parameter, Tensor] = dict(zip(self.fusion.parameters(), op_grads))
        d_group = d_rows[0]
        grads[proj_g.weight] = d_group.T @ emb
        grads[proj_g.bias] = d_group.sum(0)
        d_emb = d_group @ proj_g.weight
        if group_idx is None:
            grads[self.group_embedding] = d_emb
        else:
            grads[self.group_embedding] = torch.zeros_like(self.group_embedding).index_add_(0, group_idx, d_emb)
        for name, pr, x, d_tok in zip(names, item_proj, raw_items, d_cols):
            grads[pr.weight] = d_tok.T @ x
            grads[pr.bias] = d_tok.sum(0)
            if name == "item_id" and self.item_embedding is not None:
                grads[self.item_embedding] = torch.zeros_like(self.item_embedding).index_add_(0, item_idx, d_tok @ pr.weight)
        return loss, grads
