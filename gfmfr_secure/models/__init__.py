"""Model parameter containers, backbone specifications and the recommender module."""

from gfmfr_secure.models.backbones import BACKBONES, BackboneSpec, get_backbone, register_backbone
from gfmfr_secure.models.params import SharedParams, head_size, init_shared_params
from gfmfr_secure.models.recommender import SCORERS, LossTerms, LossWeights, RecBatch, Recommender

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "LossTerms",
    "LossWeights",
    "RecBatch",
    "Recommender",
    "SCORERS",
    "SharedParams",
    "get_backbone",
    "head_size",
    "init_shared_params",
    "register_backbone",
]
