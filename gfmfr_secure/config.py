"""Typed, frozen, validated experiment configuration.

An :class:`ExperimentConfig` is a tree of frozen dataclasses. YAML is parsed
only at the edge (:func:`load_config`); everything inside the library sees
typed, already-validated values. The conversion is generic
(:func:`from_dict`): a new section (privacy, secure aggregation, attacks) is
added by writing its dataclass and adding one field to
:class:`ExperimentConfig`; parsing, overrides, error messages and
round-tripping then work for it unchanged.

Rules applied by :func:`from_dict`:

- unknown keys are errors naming the full dotted key and listing the valid
  keys of that section; missing keys take the dataclass default;
- values must have the annotated type (``bool`` is not an ``int``); an
  ``int`` is accepted for a ``float`` field, and so is a numeric string such
  as ``1e-4`` (which YAML 1.1 reads as a string); NaN is rejected;
- ``Literal[...]`` fields accept only the listed choices;
- ``tuple[T, ...]`` fields accept a YAML list;
- range checks live in each section's ``__post_init__``; rules relating
  settings of different sections live in :mod:`gfmfr_secure.config_rules` and
  run once on the config :func:`load_config` and :func:`with_overrides`
  return (:func:`config_from_dict` builds a tree without them, as a base for
  overrides).

Overrides have the form ``dotted.key=value``; the value is parsed with
``yaml.safe_load``, so ``train.rounds=5``, ``fusion.modalities=[text]`` and
``privacy.epsilon=.inf`` all do what they say.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from gfmfr_secure.config_rules import validate
from gfmfr_secure.errors import ConfigError

__all__ = [
    "DATA_ENV_VAR",
    "AggregationConfig",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FusionConfig",
    "GroupingConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RecordConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "from_dict",
    "load_config",
    "parse_override",
    "resolve_data_folder",
    "resolve_data_path",
    "with_overrides",
]

#: Environment variable naming the data folder (used when ``--data`` is absent).
DATA_ENV_VAR = "GFMFR_DATA"

MODALITIES = ("text", "image")

T = TypeVar("T")


# --------------------------------------------------------------------------- checks


def _require(ok: bool, key: str, what: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {what}, got {value!r}")


def _check_finite(key: str, value: float) -> None:
    _require(math.isfinite(value), key, "finite", value)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    """Where the interactions come from and how they are filtered.

    Attributes
    ----------
    path : str or None
        Data folder, or an interactions ``.csv`` file. Precedence: ``--data``
        flag > ``GFMFR_DATA`` > this key.
    format : {"auto", "ml100k-mm", "csv"}
        Folder layout; ``auto`` detects it.
    implicit_threshold : float
        Ratings at or above this become positive interactions.
    kcore : int
        Iterated k-core filter on users and items (0 = off).
    min_interactions : int
        Smallest history that gets a validation item (>= 3); shorter
        histories keep a test item only (see ``gfmfr_secure.data.leave_one_out``).
    duplicates : {"error", "keep-latest"}
        What to do with repeated (user, item) pairs.
    negatives_exclude_heldout : bool
        Compatibility with the original authors' protocol: sample training
        negatives only from items the user never interacted with at all
        (which excludes the held-out items). Off by default. Combined with
        fresh negatives every round this leaks the held-out items: every other
        item is eventually drawn as a negative and pushed down (see
        docs/baselines.md).
    negatives_fixed : bool
        Compatibility with the original authors' protocol: draw the negatives
        once and reuse them every round (default: fresh every round).
    text_features, image_features : str or None
        Optional ``.npy`` files overriding the dataset's item features.
    """

    path: str | None = None
    format: Literal["auto", "ml100k-mm", "csv"] = "auto"
    implicit_threshold: float = 0.0
    kcore: int = 0
    min_interactions: int = 3
    duplicates: Literal["error", "keep-latest"] = "error"
    negatives_exclude_heldout: bool = False
    negatives_fixed: bool = False
    text_features: str | None = None
    image_features: str | None = None

    def __post_init__(self) -> None:
        _check_finite("data.implicit_threshold", self.implicit_threshold)
        _require(self.kcore >= 0, "data.kcore", ">= 0", self.kcore)
        _require(self.min_interactions >= 3, "data.min_interactions", ">= 3", self.min_interactions)


@dataclass(frozen=True)
class ModelConfig:
    """Client model.

    Attributes
    ----------
    backbone : str
        Name in the backbone registry (:mod:`gfmfr_secure.models`: ``fedrap``,
        ``fedncf``, ``pfedrec``); checked by the runner, not here.
    latent_dim : int
        Size d of user and item embeddings.
    scorer : {"dot", "mlp"}
        ``dot``: the logit is ``(e_u + w2) . (C[i] + P_u[i]) + b2``, the user vector
        scoring the item vector as in FedRAP and matrix factorisation (``w2``, the
        output layer, is the shared part of the user vector and the teacher's group
        vector); ``mlp``: the GFMFR authors' ``w2 . relu(W1 [e_u ; C[i] + P_u[i]] + b1) + b2``.
    user_init_std, item_init_std : float
        Standard deviations of the normal initial user embeddings and shared item table.
    """

    backbone: str = "fedrap"
    latent_dim: int = 64
    scorer: Literal["dot", "mlp"] = "dot"
    user_init_std: float = 0.1
    item_init_std: float = 0.1

    def __post_init__(self) -> None:
        _require(bool(self.backbone), "model.backbone", "a non-empty name", self.backbone)
        _require(self.latent_dim >= 1, "model.latent_dim", ">= 1", self.latent_dim)
        _require(self.scorer in ("dot", "mlp"), "model.scorer", "'dot' or 'mlp'", self.scorer)
        for key in ("user_init_std", "item_init_std"):
            value = getattr(self, key)
            _require(0 <= value < math.inf, "model." + key, ">= 0 and finite", value)


@dataclass(frozen=True)
class TrainConfig:
    """Federated training loop.

    Attributes
    ----------
    rounds : int
        Communication rounds T.
    local_epochs : int
        Client epochs E per round.
    batch_size : int
        Client mini-batch size.
    num_negatives : int
        Negatives sampled per positive, afresh every round.
    lr : float
        Network learning rate; round t uses ``lr * lr_decay**t``.
    lr_decay : float
        Multiplicative per-round decay of ``lr``, in (0, 1].
    item_lr_scale : float
        Item-table lr is ``lr * item_lr_scale``; 0 means ``lr * n_items``.
    item_lr_decay : float
        Multiplicative per-round decay of the item-table lr and of ``user_lr``, in (0, 1].
    weight_decay : float
        L2 weight decay of the MLP head (``mlp`` scorer).
    user_lr : float
        ``dot`` scorer: learning rate of the user vector (``e_u`` and ``w2``) and ``b2``.
    embedding_weight_decay : float
        ``dot`` scorer: L2 on the user vector and on every item row of a batch (shared
        and personal), as in matrix factorisation.
    item_aggregation : {"sum", "mean"}
        How the server applies the cohort's item-table deltas: their sum (with one local
        step and full participation this is exactly centralised gradient descent on the
        sum of the users' losses) or their mean over the cohort (FedAvg, which divides
        the step of a row by the cohort size whether or not a client touched it).
    alpha, beta : float
        FedRAP regularisers; ``alpha_t = alpha * tanh(t / 10)`` (same for beta).
    client_fraction : float
        Fraction of clients per round, in (0, 1].
    eval_every : int
        Validate every this many rounds.
    patience : int
        Validations without an improvement of NDCG@10 before stopping early;
        0 disables early stopping.
    weighting : {"uniform", "samples"}
        FedAvg weights: one per client, or proportional to its training samples.
    selection : {"best-val", "last"}
        Which round's model is tested: the best on validation (with early stopping),
        or the last one trained (validation is then only logged; what differential
        privacy needs, since validation reads users' held-out items).
    """

    rounds: int = 100
    local_epochs: int = 5
    batch_size: int = 256
    num_negatives: int = 4
    # selected on validation from {0.002, 0.01} for every federated method (docs/baselines.md);
    # the authors use 0.002 on ML-100K (their code diverges at 0.01, ours does not)
    lr: float = 0.01
    lr_decay: float = 0.8
    # item and user-vector lr 0.5 at lr 0.01, decaying 5% a round: selected on validation
    # (docs/baselines.md); the authors' lr * n_items with 0.9 decay is item_lr_scale 0
    item_lr_scale: float = 50.0
    item_lr_decay: float = 0.95
    weight_decay: float = 1.0e-4
    user_lr: float = 0.5
    embedding_weight_decay: float = 0.01
    item_aggregation: Literal["sum", "mean"] = "sum"
    alpha: float = 0.1
    beta: float = 0.1
    client_fraction: float = 1.0
    eval_every: int = 1
    patience: int = 10
    weighting: Literal["uniform", "samples"] = "uniform"
    selection: Literal["best-val", "last"] = "best-val"

    def __post_init__(self) -> None:
        p = "train."
        _require(self.rounds >= 1, p + "rounds", ">= 1", self.rounds)
        _require(self.local_epochs >= 1, p + "local_epochs", ">= 1", self.local_epochs)
        _require(self.batch_size >= 1, p + "batch_size", ">= 1", self.batch_size)
        _require(self.num_negatives >= 1, p + "num_negatives", ">= 1", self.num_negatives)
        _require(0 < self.lr < math.inf, p + "lr", "> 0 and finite", self.lr)
        _require(0 < self.lr_decay <= 1, p + "lr_decay", "in (0, 1]", self.lr_decay)
        _require(
            0 <= self.item_lr_scale < math.inf,
            p + "item_lr_scale",
            ">= 0 and finite",
            self.item_lr_scale,
        )
        _require(0 < self.item_lr_decay <= 1, p + "item_lr_decay", "in (0, 1]", self.item_lr_decay)
        _require(
            0 <= self.weight_decay < math.inf,
            p + "weight_decay",
            ">= 0 and finite",
            self.weight_decay,
        )
        _require(0 < self.user_lr < math.inf, p + "user_lr", "> 0 and finite", self.user_lr)
        _require(
            0 <= self.embedding_weight_decay < math.inf,
            p + "embedding_weight_decay",
            ">= 0 and finite",
            self.embedding_weight_decay,
        )
        _require(self.item_aggregation in ("sum", "mean"), p + "item_aggregation", "'sum' or 'mean'", self.item_aggregation)
        _require(0 <= self.alpha < math.inf, p + "alpha", ">= 0 and finite", self.alpha)
        _require(0 <= self.beta < math.inf, p + "beta", ">= 0 and finite", self.beta)
        _require(
            0 < self.client_fraction <= 1, p + "client_fraction", "in (0, 1]", self.client_fraction
        )
        _require(self.eval_every >= 1, p + "eval_every", ">= 1", self.eval_every)
        _require(self.patience >= 0, p + "patience", ">= 0", self.patience)


@dataclass(frozen=True)
class DistillConfig:
    """Group-teacher distillation (the KL term added from round 1).

    Attributes
    ----------
    enabled : bool
    ema_decay : float
        Decay of the running base-loss / KL ratio, in [0, 1).
    schedule : {"cosine", "constant"}
        ``cosine`` multiplies the weight by ``cos(pi t / 2T)``.
    max_ratio : float
        Cap on each batch's base/KL ratio before it enters the running mean
        (``inf`` = no cap). With a ratio kept per client, a batch whose KL is
        near zero would otherwise give a weight of order ``1 / KL`` and a
        gradient of order ``1 / |p - q|``, which diverges.
    """

    enabled: bool = True
    ema_decay: float = 0.9
    schedule: Literal["cosine", "constant"] = "cosine"
    max_ratio: float = 1.0

    def __post_init__(self) -> None:
        _require(0 <= self.ema_decay < 1, "distill.ema_decay", "in [0, 1)", self.ema_decay)
        _require(self.max_ratio > 0, "distill.max_ratio", "> 0", self.max_ratio)


@dataclass(frozen=True)
class GroupingConfig:
    """How clients are put into groups.

    Attributes
    ----------
    method : {"spectral", "kmeans", "oblivious", "none"}
        ``spectral`` is the paper's mode (the server sees per-client features);
        ``oblivious`` lets each client pick its nearest broadcast centroid.
    num_groups : int
        G.
    use_pca : bool
        Reduce grouping features with PCA first.
    pca_variance : float
        Explained-variance fraction kept by PCA, in (0, 1].
    min_group_size : int
        ``oblivious`` only: the fewest clients any released group sum may cover. Before the
        group sums are aggregated, the group counts are (securely) summed; every group below
        this floor is merged into its nearest group (by centroid), and a round whose whole
        cohort is below it releases nothing. A group of one would be that client's update.
    """

    method: Literal["spectral", "kmeans", "oblivious", "none"] = "spectral"
    num_groups: int = 5
    use_pca: bool = True
    pca_variance: float = 0.95
    min_group_size: int = 10

    def __post_init__(self) -> None:
        _require(self.num_groups >= 1, "grouping.num_groups", ">= 1", self.num_groups)
        _require(self.min_group_size >= 2, "grouping.min_group_size", ">= 2 (a group of one is that client's update)", self.min_group_size)
        _require(
            0 < self.pca_variance <= 1, "grouping.pca_variance", "in (0, 1]", self.pca_variance
        )


@dataclass(frozen=True)
class FusionConfig:
    """Server-side group fusion module.

    Attributes
    ----------
    operator : {"sum", "mlp", "gate", "attention", "moe"}
    embedding_dim : int
        Size of the group embedding and projected modality features.
    modalities : tuple of {"text", "image"}
        Item modalities fused with the group embedding, without repeats
        (empty: the group embedding alone).
    server_epochs : int
        Fusion-training epochs per round. 5 by default: on ML-100K-mm it tests as
        well as 50 (docs/baselines.md) at a third of the round time; the authors'
        recipe (``configs/gfmfr-paper.yaml``) uses 50.
    server_lr : float
    server_optimizer : {"sgd", "adam"}
    batch_size : int
    compile : bool
        Run each fusion-training step as one graph compiled by ``torch.compile``
        (about 1.5x faster than the eager steps for ``sum``, ``mlp`` and ``gate``, after
        15-25 s of compilation per process; needs a C++ compiler). Same arithmetic,
        float-rounding-level differences. Needs ``server_optimizer="sgd"`` and an
        operator with a hand-derived backward (not ``attention``). Without it, ``moe``
        with SGD already trains as a compiled Numba loop
        (:mod:`gfmfr_secure.server.fusion_kernel`), as fast as this and with no
        compilation per process.
    """

    operator: Literal["sum", "mlp", "gate", "attention", "moe"] = "moe"
    embedding_dim: int = 512
    modalities: tuple[str, ...] = MODALITIES
    server_epochs: int = 5
    server_lr: float = 0.002
    server_optimizer: Literal["sgd", "adam"] = "sgd"
    batch_size: int = 256
    compile: bool = False

    def __post_init__(self) -> None:
        _require(self.embedding_dim >= 1, "fusion.embedding_dim", ">= 1", self.embedding_dim)
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            raise ConfigError(
                f"fusion.modalities: unknown modality {unknown[0]!r}; valid: {', '.join(MODALITIES)}"
            )
        _require(
            len(set(self.modalities)) == len(self.modalities),
            "fusion.modalities",
            "without repeats",
            list(self.modalities),
        )
        _require(self.server_epochs >= 1, "fusion.server_epochs", ">= 1", self.server_epochs)
        _require(
            0 < self.server_lr < math.inf, "fusion.server_lr", "> 0 and finite", self.server_lr
        )
        _require(self.batch_size >= 1, "fusion.batch_size", ">= 1", self.batch_size)
        if self.compile and (self.server_optimizer != "sgd" or self.operator == "attention"):
            raise ConfigError(
                "fusion.compile needs fusion.server_optimizer=sgd and an operator with a "
                "hand-derived backward (sum, mlp, gate, moe); got "
                f"server_optimizer={self.server_optimizer!r}, operator={self.operator!r}"
            )


@dataclass(frozen=True)
class AggregationConfig:
    """Aggregation backend.

    Attributes
    ----------
    backend : str
        Name in the aggregation-backend registry (checked there, not here):
        ``plain``, ``masking`` or ``ckks``.
    value_bound : float
        Largest absolute value of an uploaded coordinate (secure backends range-check
        every upload against it; masking sizes its fixed-point encoding from it).
    neighbours : int
        ``masking``: SecAgg+ neighbourhood degree k (even); 0 = the complete graph.
    threshold_fraction : float
        ``masking``: Shamir threshold t as a fraction of each closed neighbourhood, in
        (0.5, 1]: a strict majority, so that a server lying about dropouts cannot collect
        both secrets of one client (with c colluding clients in a neighbourhood of size m,
        it holds while 2 t > m + c).
    dropout : float
        ``masking``: fraction of each cohort that drops after masking (recovered
        from the survivors' shares), to exercise and cost the recovery.
    custody : str
        ``ckks``: who holds the secret key: ``authority`` (a key authority that
        decrypts aggregates, apart from the aggregator) or ``shared-clients``.
    """

    backend: str = "plain"
    value_bound: float = 8.0
    neighbours: int = 20
    threshold_fraction: float = 0.6
    dropout: float = 0.0
    custody: Literal["authority", "shared-clients"] = "authority"

    def __post_init__(self) -> None:
        _require(bool(self.backend), "aggregation.backend", "a non-empty name", self.backend)
        _require(0 < self.value_bound < math.inf, "aggregation.value_bound", "> 0 and finite", self.value_bound)
        _require(self.neighbours >= 0 and self.neighbours % 2 == 0, "aggregation.neighbours", "an even integer >= 0", self.neighbours)
        _require(
            0.5 < self.threshold_fraction <= 1,
            "aggregation.threshold_fraction",
            "in (0.5, 1], a strict majority (at 0.5 a server lying about one dropout unmasks a client; "
            "use e.g. 0.6)",
            self.threshold_fraction,
        )
        _require(0 <= self.dropout < 0.5, "aggregation.dropout", "in [0, 0.5)", self.dropout)


@dataclass(frozen=True)
class PrivacyConfig:
    """User-level differential privacy of the released aggregates (DESIGN section 4).

    Attributes
    ----------
    mechanism : str
        ``none``; ``central`` (clients clip, the aggregator or decryptor adds
        N(0, (sigma Delta)^2) to each released sum); ``distributed`` (clients clip
        and each adds a share of that noise, sized so that ``honest_fraction`` of
        the cohort carries all of it); ``local`` (each client noises its own
        upload: the FedRec local-DP baseline, protecting against the server too);
        ``dpsgd`` (record-level DP-SGD inside each client through Opacus; the
        unit is one interaction, not one user).
    epsilon, delta : float
        Target budget. With ``noise_multiplier`` unset, sigma is calibrated so
        that ``train.rounds`` rounds at rate ``train.client_fraction`` spend at most
        ``epsilon``; training stops before any round that would exceed it.
        ``epsilon = .inf`` with ``noise_multiplier`` set only reports epsilon.
    noise_multiplier : float or None
        sigma; None = calibrate from ``epsilon``.
    clip : float
        L2 bound C of each client's whole update (``.inf`` = no clipping, only
        allowed with sigma = 0).
    clipping : str
        ``flat`` (one norm over all tensors) or ``per-tensor`` (item rows and head
        each clipped to C / sqrt(2); same sensitivity).
    count_scale : float
        Each client writes ``count_scale * C`` into its group's count coordinate,
        so the sensitivity of the released vector is ``Delta = C sqrt(1 + count_scale^2)``.
    accountant : str
        ``rdp`` or ``prv`` (Opacus accountants).
    honest_fraction : float
        ``distributed`` only: fraction of each round's cohort assumed honest.
    adaptive_clip : bool
        Adaptive clipping (Andrew et al. 2021): C follows the ``target_quantile`` of
        update norms through a noised count of unclipped clients; sigma is split
        between the update and the count so the total noise multiplier stays sigma.
    target_quantile, clip_lr, clip_count_stddev : float
        Adaptive clipping: quantile gamma, geometric step eta, std of the noise
        on the unclipped count (0 = expected cohort / 20, as in the paper).
    dpsgd_noise_multiplier, dpsgd_max_grad_norm, dpsgd_batch_size : float, float, int
        ``dpsgd`` only: Opacus's sigma, per-example clip and expected batch size.
    dpsgd_all_rows : bool
        ``dpsgd`` only: each client uploads every item-table row (noised) instead of
        the rows it trained on, whose identity would reveal its interactions. Slow
        (a dense per-example gradient over the whole table); without it the
        record-level epsilon is withheld.
    """

    mechanism: Literal["none", "central", "distributed", "local", "dpsgd"] = "none"
    epsilon: float = math.inf
    delta: float = 1.0e-4
    noise_multiplier: float | None = None
    clip: float = 1.0
    clipping: Literal["flat", "per-tensor"] = "flat"
    count_scale: float = 0.5
    accountant: Literal["rdp", "prv"] = "rdp"
    honest_fraction: float = 1.0
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clip_count_stddev: float = 0.0
    dpsgd_noise_multiplier: float = 1.0
    dpsgd_max_grad_norm: float = 1.0
    dpsgd_batch_size: int = 64
    dpsgd_all_rows: bool = False

    def __post_init__(self) -> None:
        _require(self.epsilon > 0, "privacy.epsilon", "> 0 (.inf allowed)", self.epsilon)
        _require(0 < self.delta < 1, "privacy.delta", "in (0, 1)", self.delta)
        if self.noise_multiplier is not None:
            _require(
                0 <= self.noise_multiplier < math.inf, "privacy.noise_multiplier", ">= 0 and finite, or null", self.noise_multiplier
            )
        _require(self.clip > 0, "privacy.clip", "> 0 (.inf = no clipping)", self.clip)
        _require(0 < self.count_scale < math.inf, "privacy.count_scale", "> 0 and finite", self.count_scale)
        _require(0 < self.honest_fraction <= 1, "privacy.honest_fraction", "in (0, 1]", self.honest_fraction)
        _require(0 < self.target_quantile < 1, "privacy.target_quantile", "in (0, 1)", self.target_quantile)
        _require(0 < self.clip_lr < math.inf, "privacy.clip_lr", "> 0 and finite", self.clip_lr)
        _require(0 <= self.clip_count_stddev < math.inf, "privacy.clip_count_stddev", ">= 0 and finite", self.clip_count_stddev)
        _require(self.dpsgd_noise_multiplier >= 0, "privacy.dpsgd_noise_multiplier", ">= 0", self.dpsgd_noise_multiplier)
        _require(self.dpsgd_max_grad_norm > 0, "privacy.dpsgd_max_grad_norm", "> 0", self.dpsgd_max_grad_norm)
        _require(self.dpsgd_batch_size >= 1, "privacy.dpsgd_batch_size", ">= 1", self.dpsgd_batch_size)
        if self.mechanism in ("central", "distributed", "local"):
            if self.noise_multiplier is None and math.isinf(self.epsilon):
                raise ConfigError(
                    f"privacy.mechanism={self.mechanism!r} needs privacy.epsilon (finite) or privacy.noise_multiplier"
                )
            if math.isinf(self.clip) and (self.noise_multiplier is None or self.noise_multiplier > 0):
                raise ConfigError("privacy.clip=.inf (no clipping) has unbounded sensitivity: only privacy.noise_multiplier=0 is allowed")
            if math.isinf(self.clip) and self.adaptive_clip:
                raise ConfigError("privacy.adaptive_clip needs a finite initial privacy.clip")


@dataclass(frozen=True)
class RecordConfig:
    """What a run keeps for later analysis.

    Attributes
    ----------
    views_rounds : tuple of int
        Rounds whose adversary views (what the server and an outsider received)
        are written to ``views/`` in the run folder, so attacks run without
        retraining. Empty: none. Under ``plain`` a round's server view holds every
        client's upload (about 100 MB per round on ML-100K).
    """

    views_rounds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _require(all(r >= 0 for r in self.views_rounds), "record.views_rounds", "rounds >= 0", list(self.views_rounds))


@dataclass(frozen=True)
class EvalConfig:
    """Full-ranking evaluation.

    Attributes
    ----------
    ks : tuple of int
        Distinct cut-offs K for HR@K, NDCG@K, ...
    chunk_users : int
        Users scored at once (memory is O(chunk_users x n_items)).
    max_users : int
        Largest number of users a federated run's validation and test rank (>= 0; 0 = no
        limit). With more users holding a held-out item than this, every validation and
        the test rank the same random sample of ``max_users`` of the users that have a test
        item, drawn once from the run's seed (the validation: those of them with a
        validation item); ``metrics.json`` gives the number ranked (``users``). The default
        keeps every user up to 20,000 of them (ML-100K, ML-1M); on 2 cores ranking all of
        100k users over 50k items takes about 15 s, a sample of 20,000 about 3 s.
    """

    ks: tuple[int, ...] = (10, 20, 50)
    chunk_users: int = 1024
    max_users: int = 20000

    def __post_init__(self) -> None:
        _require(len(self.ks) >= 1, "eval.ks", "a non-empty list", list(self.ks))
        _require(all(k >= 1 for k in self.ks), "eval.ks", "a list of integers >= 1", list(self.ks))
        _require(len(set(self.ks)) == len(self.ks), "eval.ks", "without repeats", list(self.ks))
        _require(self.chunk_users >= 1, "eval.chunk_users", ">= 1", self.chunk_users)
        _require(self.max_users >= 0, "eval.max_users", ">= 0 (0 = every user)", self.max_users)


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: the root of the configuration tree.

    Attributes
    ----------
    method : str
        Name in the runner's method registry (checked by the runner).
    seed : int
        Root seed from which every simulation generator is derived (>= 0): sampling,
        negatives, initialisation, shuffles. It is written to ``config.yaml`` and ``run.json``.
    secrets : {"os", "reproducible"}
        Where secrets come from: secure-aggregation keys and mask seeds, Shamir coefficients
        and every DP noise draw. ``os`` (default): the operating system's CSPRNG, unrelated to
        the seed. ``reproducible``: derived from ``seed``, for tests and exact replays; anyone
        with the seed can then strip the masks and subtract the noise, so no security or
        privacy claim holds for such a run (``metrics.json`` says which mode ran).
    """

    method: str = "gfmfr"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    secrets: Literal["os", "reproducible"] = "os"

    def __post_init__(self) -> None:
        _require(bool(self.method), "method", "a non-empty name", self.method)
        _require(self.seed >= 0, "seed", ">= 0", self.seed)


# --------------------------------------------------------------------------- generic conversion

_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, tp: Any, value: object) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _convert(tp: Any, value: object, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return the typed value."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(key, tp, value)
        return from_dict(typing.cast(type, tp), value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(key, tp, value)
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) != 1:
            raise TypeError(f"{key}: unions other than 'X | None' are not supported ({tp})")
        inner = non_none[0]
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            return _convert(inner, value, key)  # keep the nested section's own message
        try:
            return _convert(inner, value, key)
        except ConfigError:
            raise _type_error(key, tp, value) from None
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices:
            raise ConfigError(
                f"{key}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}"
            )
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{key}: only tuple[T, ...] fields are supported ({tp})")
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        return tuple(_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, tp, value)
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key, tp, value)
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{key}: NaN is not allowed")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(key, tp, value)
        return value
    raise TypeError(f"{key}: unsupported field type {tp!r} in the config schema")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the (nested, frozen) dataclass ``cls`` from a plain mapping.

    Works for any dataclass whose fields are annotated with ``bool``, ``int``,
    ``float``, ``str``, ``X | None``, ``Literal[...]``, ``tuple[T, ...]`` or
    another such dataclass. Missing keys take the field default.

    Parameters
    ----------
    cls : dataclass type
    data : dict
        Parsed YAML (string keys).
    prefix : str
        Dotted path of ``data`` inside the whole config, used in error messages.

    Returns
    -------
    An instance of ``cls``.

    Raises
    ------
    ConfigError
        Unknown key (naming the dotted key and the valid keys), wrong type
        (naming the key, the expected type and the value), or a value outside
        its range.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    where = prefix or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"unknown config key {_join(prefix, str(key))!r}; valid keys in {where}: "
                f"{', '.join(fields)}"
            )
    kwargs = {
        name: _convert(hints[name], data[name], _join(prefix, name))
        for name in fields
        if name in data
    }
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Validated :class:`ExperimentConfig` from a plain mapping (e.g. parsed YAML)."""
    return from_dict(ExperimentConfig, data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config; inverse of :func:`config_from_dict`."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {cfg!r}")
    tree: dict[str, Any] = _plain(dataclasses.asdict(cfg))
    return tree


def config_to_yaml(cfg: Any) -> str:
    """YAML text of a config, in schema order; :func:`load_config` reads it back."""
    text: str = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    return text


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into ``(["a", "b", "c"], yaml.safe_load(value))``.

    Raises
    ------
    ConfigError
        If there is no ``=``, the key is empty, or the value is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected the form dotted.key=value")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {text!r}: empty component in key {key!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return parts, value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _apply_override(tree: dict[str, Any], text: str) -> None:
    parts, value = parse_override(text)
    node = tree
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        section = ".".join(parts[:depth]) or "the top level"
        if part not in node:
            raise ConfigError(
                f"override {text!r}: unknown config key {dotted!r}; valid keys in {section}: "
                f"{', '.join(node)}"
            )
        if depth == len(parts) - 1:
            if isinstance(node[part], dict) and isinstance(value, dict):
                node[part] = _merge(node[part], value)
            else:
                node[part] = value
        else:
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {dotted!r} is a value, not a section")
            node = node[part]


def with_overrides(cfg: T, overrides: typing.Iterable[str]) -> T:
    """Return a copy of ``cfg`` with ``dotted.key=value`` overrides applied in order.

    All overrides are applied first and the result is validated once, as a
    whole (so settings that depend on each other can be changed together); an
    override that breaks a check fails here, naming the overrides. An
    :class:`ExperimentConfig` then passes the rules that span sections
    (:func:`gfmfr_secure.config_rules.validate`), with or without overrides.
    """
    tree = config_to_dict(cfg)
    texts = list(overrides)
    for text in texts:
        _apply_override(tree, text)
    if texts:
        try:
            cfg = from_dict(type(cfg), tree)
        except ConfigError as err:
            shown = ", ".join(repr(t) for t in texts)
            raise ConfigError(f"override {shown}: {err}") from None
    if isinstance(cfg, ExperimentConfig):
        validate(cfg)
    return cfg


# --------------------------------------------------------------------------- files and paths


def load_config(
    path: str | os.PathLike[str], overrides: typing.Iterable[str] = ()
) -> ExperimentConfig:
    """Read a YAML config file, apply ``--set`` overrides and validate the result.

    Each section's own checks run as it is read; the rules that span sections
    (:func:`gfmfr_secure.config_rules.validate`) run once on the result, before any
    data is loaded.

    Parameters
    ----------
    path : path of the YAML file. An empty file (or one holding only comments)
        gives the defaults.
    overrides : ``dotted.key=value`` strings, applied in order.

    Raises
    ------
    ConfigError
        If the file is missing or unreadable, is not UTF-8 text, is not YAML,
        is not a mapping, or any key or value is invalid (the message names the file).
    """
    path = Path(path)
    shown = repr(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {shown} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {shown} is a directory") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {shown} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
            f"offset {err.start}): a config is a YAML mapping such as configs/gfmfr.yaml "
            "(list them with 'gfmfr-secure configs')"
        ) from None
    except OSError as err:
        raise ConfigError(f"config file {shown} cannot be read: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {shown} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {shown} holds a YAML {type(data).__name__}; expected a mapping of "
            "sections to settings (method: gfmfr, train: {rounds: 5}, ...), as in configs/gfmfr.yaml"
        )
    try:
        cfg = config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"config file {str(path)!r}: {err}") from None
    return with_overrides(cfg, overrides)


def resolve_data_folder(
    cli_path: str | os.PathLike[str] | None = None,
    config_path: str | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> str:
    """Absolute path of the data folder (or interactions ``.csv`` file), from the first source that names one.

    Precedence: ``cli_path`` (the ``--data`` flag) > the ``GFMFR_DATA``
    environment variable > ``config_path`` (the ``data.path`` key). A
    relative path is taken relative to the current working directory.

    Raises
    ------
    ConfigError
        If no source names a folder, or the chosen path is neither an existing
        folder nor an existing ``.csv`` file (the message says which source it
        came from).
    """
    env = os.environ if environ is None else environ
    if cli_path is not None and str(cli_path):
        chosen, source = str(cli_path), "--data"
    elif env.get(DATA_ENV_VAR):
        chosen, source = env[DATA_ENV_VAR], f"${DATA_ENV_VAR}"
    elif config_path:
        chosen, source = config_path, "config key data.path"
    else:
        raise ConfigError(
            f"no data folder: pass --data DIR or set {DATA_ENV_VAR} "
            "(or data.path in the config file)"
        )
    folder = Path(chosen).expanduser().absolute()
    if not (folder.is_dir() or (folder.is_file() and folder.suffix.lower() == ".csv")):
        raise ConfigError(
            f"data folder {chosen!r} (from {source}) is not an existing directory or .csv file"
        )
    return str(folder)


def resolve_data_path(
    cfg: ExperimentConfig,
    cli_path: str | os.PathLike[str] | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> ExperimentConfig:
    """Copy of ``cfg`` whose ``data.path`` is the absolute folder (or ``.csv`` file) chosen by :func:`resolve_data_folder`."""
    folder = resolve_data_folder(cli_path, cfg.data.path, environ)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=folder))
