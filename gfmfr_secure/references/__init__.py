"""Reference scorers for ``gfmfr-secure evaluate --scorer NAME``: the accuracy yardsticks.

Each is registered by name (:func:`register_reference`) and built from a split
and :class:`ReferenceOptions` into a :class:`ReferenceFit`: a score function
``users: int64 [B] -> scores [B, I]`` for
:func:`gfmfr_secure.metrics.evaluate_ranking`, plus the settings it used
(those chosen on validation included), so a printed figure says what produced it.

- ``popularity``: number of training interactions of each item;
- ``random``: seeded uniform noise;
- ``ease``: centralised EASE, lambda chosen on validation (:mod:`.ease`);
- ``mf``: centralised BPR matrix factorisation, epoch (and, given a grid,
  learning rate and weight decay) chosen on validation (:mod:`.mf`).

Every choice reads the training interactions and validation items only; test
items are blanked before any model is fitted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gfmfr_secure.data import Split
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.references.ease import DEFAULT_LAMBDAS, select_ease_lambda
from gfmfr_secure.references.mf import MFSettings, select_mf
from gfmfr_secure.rng import torch_generator

__all__ = [
    "REFERENCES",
    "ReferenceFit",
    "ReferenceOptions",
    "build_reference",
    "register_reference",
]


@dataclass(frozen=True)
class ReferenceOptions:
    """What a reference scorer may be configured with (each reads the fields it needs).

    Attributes
    ----------
    seed : int
        Root seed (random scorer, MF initialisation and negatives).
    ks : tuple of int
        Cut-offs of the validation metrics used in selection (must include 10).
    chunk_users : int
        Users scored at once.
    ease_lambdas : tuple of float
        EASE's lambda grid.
    mf_lrs, mf_weight_decays : tuple of float
        MF's grid (one value each: no search beyond the epoch).
    mf : MFSettings
        MF's other settings.
    """

    seed: int = 0
    ks: tuple[int, ...] = (10, 20, 50)
    chunk_users: int = 1024
    ease_lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    mf_lrs: tuple[float, ...] = (MFSettings.lr,)
    mf_weight_decays: tuple[float, ...] = (MFSettings.weight_decay,)
    mf: MFSettings = field(default_factory=MFSettings)


@dataclass(frozen=True)
class ReferenceFit:
    """A built reference scorer.

    Attributes
    ----------
    score_fn : callable
        ``users: int64 [B] -> scores [B, I]``.
    settings : dict
        Settings used, including those chosen on validation (empty for fixed scorers).
    """

    score_fn: Callable[[Tensor], Tensor]
    settings: dict[str, Any] = field(default_factory=dict)


ReferenceBuilder = Callable[[Split, ReferenceOptions], ReferenceFit]

#: name -> builder; see :func:`register_reference`.
REFERENCES: dict[str, ReferenceBuilder] = {}


def register_reference(name: str) -> Callable[[ReferenceBuilder], ReferenceBuilder]:
    """Decorator registering ``builder(split, options) -> ReferenceFit`` under ``name``.

    Raises
    ------
    ValueError
        ``name`` is already registered.
    """

    def decorate(builder: ReferenceBuilder) -> ReferenceBuilder:
        if name in REFERENCES:
            raise ValueError(f"reference scorer {name!r} is already registered; known: {', '.join(sorted(REFERENCES))}")
        REFERENCES[name] = builder
        return builder

    return decorate


def build_reference(name: str, split: Split, options: ReferenceOptions = ReferenceOptions()) -> ReferenceFit:
    """Build the reference scorer ``name`` on ``split``.

    Raises
    ------
    ConfigError
        Unknown name (the known ones are listed).
    """
    if name not in REFERENCES:
        raise ConfigError(f"unknown reference scorer {name!r}; known: {', '.join(sorted(REFERENCES))}")
    return REFERENCES[name](split, options)


@register_reference("popularity")
def _popularity(split: Split, options: ReferenceOptions) -> ReferenceFit:
    n_items = int(split.n_items)
    items = torch.as_tensor(split.train_items, dtype=torch.int64)
    counts = torch.bincount(items, minlength=n_items).to(torch.float32)  # [I]
    return ReferenceFit(lambda users: counts.expand(users.numel(), n_items))


@register_reference("random")
def _random(split: Split, options: ReferenceOptions) -> ReferenceFit:
    n_items = int(split.n_items)
    gen = torch_generator(options.seed, "evaluate", "random-scorer")
    return ReferenceFit(lambda users: torch.rand(users.numel(), n_items, generator=gen))


@register_reference("ease")
def _ease(split: Split, options: ReferenceOptions) -> ReferenceFit:
    from gfmfr_secure.references.ease import ease_scorer

    chosen = select_ease_lambda(split, options.ease_lambdas, ks=options.ks, chunk_size=options.chunk_users)
    settings = {
        "lambda": chosen.lam,
        "val_ndcg10_by_lambda": {f"{lam:g}": round(ndcg, 4) for lam, ndcg in chosen.grid},
    }
    return ReferenceFit(ease_scorer(split, chosen.weights), settings)


@register_reference("mf")
def _mf(split: Split, options: ReferenceOptions) -> ReferenceFit:
    chosen = select_mf(split, options.mf_lrs, options.mf_weight_decays, options.mf, options.seed, ks=options.ks)
    best = chosen.best
    settings: dict[str, Any] = {
        "loss": "bpr",
        "dim": best.settings.dim,
        "lr": best.settings.lr,
        "weight_decay": best.settings.weight_decay,
        "negatives": best.settings.negatives,
        "epoch": best.best_epoch,
        "seed": options.seed,
    }
    if len(chosen.grid) > 1:
        settings["val_ndcg10_by_setting"] = {
            f"lr={lr:g} wd={wd:g}": f"{ndcg:.4f} (epoch {epoch})" for lr, wd, ndcg, epoch in chosen.grid
        }
    return ReferenceFit(best.model.scorer(), settings)
