"""Server-side multimodal item encoders.

The server turns raw item content into the text and image features the
group fusion module consumes. Public API::

    from gfmfr_secure.encoders import encode_dataset, load_encode_config, FeatureCache

    out, manifest = encode_dataset("data/ml-100k-mm", "features/ml-100k-mm",
                                   load_encode_config("configs/encoders/default.yaml"),
                                   cache=FeatureCache(default_cache_dir()))

Lower level: :func:`encode_items` for one modality of plain inputs,
:func:`build_encoder` / :func:`register_encoder` for the encoder registry
(``minilm``, ``efficientnet-lite0``, ``hf-text``, ``hf-image``, ``hf-clip``),
:func:`compose_item_text` for the text recipe. Importing this package loads
no model and no heavy library; those come with the first encoding call.
"""

from gfmfr_secure.encoders.image import (
    EfficientNetLite0Encoder,
    HFClipEncoder,
    HFImageEncoder,
    efficientnet_input,
    load_rgb,
)
from gfmfr_secure.encoders.pipeline import (
    CACHE_ENV_VAR,
    EncodeConfig,
    EncoderSpec,
    FeatureCache,
    ModalityResult,
    default_cache_dir,
    default_out_dir,
    encode_config_from_dict,
    encode_content,
    encode_dataset,
    encode_items,
    hash_image_files,
    hash_texts,
    load_encode_config,
    write_outputs,
)
from gfmfr_secure.encoders.registry import (
    MODALITIES,
    Encoder,
    available_encoders,
    build_encoder,
    get_encoder,
    register_encoder,
)
from gfmfr_secure.encoders.text import (
    TEXT_RECIPE,
    HFTextEncoder,
    MiniLMEncoder,
    compose_item_text,
    item_texts,
)

__all__ = [
    "CACHE_ENV_VAR",
    "MODALITIES",
    "TEXT_RECIPE",
    "EfficientNetLite0Encoder",
    "EncodeConfig",
    "Encoder",
    "EncoderSpec",
    "FeatureCache",
    "HFClipEncoder",
    "HFImageEncoder",
    "HFTextEncoder",
    "MiniLMEncoder",
    "ModalityResult",
    "available_encoders",
    "build_encoder",
    "compose_item_text",
    "default_cache_dir",
    "default_out_dir",
    "efficientnet_input",
    "encode_config_from_dict",
    "encode_content",
    "encode_dataset",
    "encode_items",
    "get_encoder",
    "hash_image_files",
    "hash_texts",
    "item_texts",
    "load_encode_config",
    "load_rgb",
    "register_encoder",
    "write_outputs",
]
