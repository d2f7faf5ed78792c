"""Server-side logic of GFMFR: grouping, the group fusion module and the teacher.

Server code receives aggregates (or, with the ``plain`` backend, per-client
updates) and never touches the client state store.
"""

from __future__ import annotations

from gfmfr_secure.server.fusion import GroupFusion
from gfmfr_secure.server.fusion_training import OPTIMIZERS, train_fusion
from gfmfr_secure.server.grouping import (
    GROUPERS,
    Grouper,
    align_groups,
    get_grouper,
    group_clients,
    nearest_centroid,
    preprocess_features,
    rbf_gamma_median,
    register_grouper,
)
from gfmfr_secure.server.operators import (
    FUSION_OPERATORS,
    FusionOperator,
    OperatorOptions,
    get_fusion_operator,
    register_fusion_operator,
)
from gfmfr_secure.server.teacher import group_preferences

__all__ = [
    "FUSION_OPERATORS",
    "GROUPERS",
    "OPTIMIZERS",
    "FusionOperator",
    "GroupFusion",
    "Grouper",
    "OperatorOptions",
    "align_groups",
    "get_fusion_operator",
    "get_grouper",
    "group_clients",
    "group_preferences",
    "nearest_centroid",
    "preprocess_features",
    "rbf_gamma_median",
    "register_fusion_operator",
    "register_grouper",
    "train_fusion",
]
