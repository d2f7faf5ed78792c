"""Model parameter containers and backbone specifications."""

from gfmfr_secure.models.backbones import BACKBONES, BackboneSpec, get_backbone, register_backbone
from gfmfr_secure.models.params import SharedParams, head_size, init_shared_params

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "SharedParams",
    "get_backbone",
    "head_size",
    "init_shared_params",
    "register_backbone",
]
