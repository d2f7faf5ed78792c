"""Encode item text and images into feature files, with a content-addressed cache.

Flow of :func:`encode_dataset` (the ``gfmfr-secure encode`` command)::

    load_dataset(DIR) -> item texts (recipe of encoders.text) and image paths
      -> encode_items(text) / encode_items(image)     cache hit: no model work
      -> write_outputs(OUT)   text_feat.npy  text_mask.npy
                              image_feat.npy image_mask.npy  manifest.json

Conventions
-----------
- Row ``k`` of every output belongs to item index ``k`` of the dataset (its
  item order: ascending original id for the bundled loaders).
- An item without content (an empty text, no image file) gets a zero row and
  ``False`` in the modality's mask; present items get ``True``.
- The cache key is the sha256 of the encoder's identity (name, package
  versions, model fingerprint, preprocessing recipe), the number of items and
  the combined hash of the inputs (the text strings, or the bytes of the image
  files; file locations do not count). A second run on the same inputs loads
  the matrix from the cache and does no model work. Batch size and device are
  not part of the key: they change results only at float rounding level.
- Outputs are written to temporary files in the output folder and moved into
  place with :func:`os.replace` once all of them are complete; the manifest
  goes last. The data folder is never written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from gfmfr_secure.encoders.registry import MODALITIES, Encoder, build_encoder, get_encoder
from gfmfr_secure.encoders.text import TEXT_RECIPE, item_texts
from gfmfr_secure.errors import ConfigError, DataError

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_CACHE_DIR",
    "MANIFEST_NAME",
    "EncodeConfig",
    "EncoderSpec",
    "FeatureCache",
    "ModalityResult",
    "cache_key",
    "default_cache_dir",
    "default_out_dir",
    "encode_config_from_dict",
    "encode_content",
    "encode_dataset",
    "encode_items",
    "file_sha256",
    "hash_image_files",
    "hash_texts",
    "load_encode_config",
    "write_outputs",
]

#: Environment variable naming the cache folder.
CACHE_ENV_VAR = "GFMFR_CACHE"
#: Cache folder used when neither a flag nor ``$GFMFR_CACHE`` names one.
DEFAULT_CACHE_DIR = Path("~/.cache/gfmfr-secure/encoders")
#: Name of the manifest written beside the features.
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

_INPUT_DESCRIPTION = {
    "text": TEXT_RECIPE,
    "image": "the item's image file (dataset image_paths); items without one get a zero row",
}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder serves one modality, with its options.

    Attributes
    ----------
    encoder : str
        Registered encoder name (``minilm``, ``efficientnet-lite0``, ``hf-text``,
        ``hf-image``, ``hf-clip``, ...).
    options : Mapping[str, Any]
        Constructor options of that encoder (``path``, ``device``, ...).
    batch_size : int
        Items per model call.
    """

    encoder: str
    options: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ConfigError(f"encoder must be a non-empty string, got {self.encoder!r}")
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(
                f"encoder {self.encoder!r}: batch_size must be a positive integer, got {size!r}"
            )
        object.__setattr__(self, "options", dict(self.options))

    def build(self, modality: str) -> Encoder:
        """Instantiate the encoder for ``modality`` (no model is loaded yet)."""
        return build_encoder(self.encoder, modality, self.options)


@dataclass(frozen=True)
class EncodeConfig:
    """Encoders to run, one per modality; ``None`` skips a modality.

    The default is the recipe of the reference features: ``minilm`` for text
    and ``efficientnet-lite0`` for images (``configs/encoders/default.yaml``).
    """

    text: EncoderSpec | None = field(
        default_factory=lambda: EncoderSpec("minilm", {"device": "cpu"}, 64)
    )
    image: EncoderSpec | None = field(
        default_factory=lambda: EncoderSpec("efficientnet-lite0", {"device": "cpu"}, 8)
    )

    def specs(self) -> dict[str, EncoderSpec]:
        """The enabled modalities and their specs, in :data:`MODALITIES` order."""
        chosen = {"text": self.text, "image": self.image}
        return {m: spec for m, spec in chosen.items() if spec is not None}


def encode_config_from_dict(
    raw: Any, source: str = "config", base_dir: Path | None = None
) -> EncodeConfig:
    """Build an :class:`EncodeConfig` from parsed YAML.

    Parameters
    ----------
    raw : mapping
        ``{"text": SECTION | None, "image": SECTION | None}``; a missing key
        keeps the default of that modality, ``null`` disables it. A SECTION
        holds ``encoder`` (required), ``batch_size`` (optional) and the
        encoder's options (``path``, ``device``, ...).
    source : str
        Name of the origin, quoted in errors.
    base_dir : Path, optional
        Folder against which a relative ``path`` option is resolved (the
        config file's folder); ``~`` is expanded.

    Raises
    ------
    ConfigError
        Unknown keys, a missing ``encoder``, an unknown encoder or option, an
        encoder that does not serve the modality, a bad batch size.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping with keys text / image, got {type(raw).__name__}"
        )
    unknown = sorted(set(map(str, raw)) - set(MODALITIES))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(MODALITIES)}"
        )
    defaults = EncodeConfig()
    chosen: dict[str, EncoderSpec | None] = {"text": defaults.text, "image": defaults.image}
    for modality in MODALITIES:
        if modality not in raw:
            continue
        section = raw[modality]
        where = f"{source}: {modality}"
        if section is None:
            chosen[modality] = None
            continue
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where}: expected a mapping or null, got {type(section).__name__}")
        section = dict(section)
        name = section.pop("encoder", None)
        if name is None:
            raise ConfigError(f"{where}: missing key 'encoder'")
        batch_size = section.pop("batch_size", 32)
        if "path" in section and isinstance(section["path"], str):
            path = Path(section["path"]).expanduser()
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            section["path"] = str(path)
        try:
            spec = EncoderSpec(str(name), section, batch_size)
            cls = get_encoder(spec.encoder)
            if modality not in cls.modalities:
                raise ConfigError(
                    f"encoder {spec.encoder!r} cannot encode {modality!r}; it serves: {', '.join(cls.modalities)}"
                )
            bad = sorted(set(spec.options) - set(cls.option_names))
            if bad:
                raise ConfigError(
                    f"encoder {spec.encoder!r}: unknown option(s) {', '.join(bad)}; "
                    f"accepted: {', '.join(cls.option_names) or '(none)'}, batch_size"
                )
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
        chosen[modality] = spec
    return EncodeConfig(text=chosen["text"], image=chosen["image"])


def load_encode_config(path: str | os.PathLike[str]) -> EncodeConfig:
    """Read an encoder config YAML file (see ``configs/encoders/``).

    Raises
    ------
    ConfigError
        Missing or unparsable file, or invalid content (see
        :func:`encode_config_from_dict`).
    """
    import yaml

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"{file}: encoder config not found") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: not valid YAML ({err})") from err
    return encode_config_from_dict(raw, source=str(file), base_dir=file.resolve().parent)


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The cache folder when no flag names one.

    ``$GFMFR_CACHE`` when set and non-empty; else
    ``$XDG_CACHE_HOME/gfmfr-secure/encoders`` when ``XDG_CACHE_HOME`` is set;
    else ``~/.cache/gfmfr-secure/encoders``.
    """
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV_VAR):
        return Path(env[CACHE_ENV_VAR]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "gfmfr-secure" / "encoders"
    return DEFAULT_CACHE_DIR.expanduser()


# --------------------------------------------------------------------------- hashing


def hash_texts(texts: Sequence[str | None]) -> str:
    """Combined sha256 (hex) of a list of strings, order and missing entries included.

    Each entry contributes a presence byte, its UTF-8 length and its bytes, so
    different lists never share a byte stream.
    """
    digest = hashlib.sha256(b"gfmfr-texts\0")
    for text in texts:
        if text is None:
            digest.update(b"\0")
            continue
        data = text.encode("utf-8")
        digest.update(b"\1" + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes.

    Raises
    ------
    DataError
        If the file cannot be read (the path is named).
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(2**20), b""):
                digest.update(chunk)
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    return digest.hexdigest()


def hash_image_files(paths: Sequence[str | os.PathLike[str] | None]) -> str:
    """Combined sha256 (hex) of image files: each file's content hash, in order.

    ``None`` entries (items without an image) contribute a fixed marker. The
    locations of the files do not enter the hash.

    Raises
    ------
    DataError
        If a listed file cannot be read.
    """
    digest = hashlib.sha256(b"gfmfr-images\0")
    for path in paths:
        if path is None:
            digest.update(b"\0")
        else:
            digest.update(b"\1" + bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def cache_key(identity: Mapping[str, Any], input_sha256: str, n_items: int) -> str:
    """sha256 (hex) of the encoder identity, the inputs' combined hash and the item count."""
    payload = json.dumps(
        {"identity": identity, "inputs": input_sha256, "n_items": int(n_items)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- cache


class FeatureCache:
    """Folder of encoded matrices, one ``<key>.npz`` per cache key.

    Parameters
    ----------
    root : str or Path
        Cache folder (created on the first store).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def path_for(self, key: str) -> Path:
        """File holding the entry ``key``."""
        return self.root / f"{key}.npz"

    def load(self, key: str, expected_mask: np.ndarray) -> np.ndarray | None:
        """Features stored under ``key``, or None when absent.

        Parameters
        ----------
        key : str
            Cache key.
        expected_mask : np.ndarray
            ``bool [N]`` presence mask the entry must match.

        Returns
        -------
        np.ndarray or None
            ``float32 [N, D]``.

        Raises
        ------
        DataError
            If the entry exists but is unreadable or inconsistent (delete it).
        """
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as entry:
                features = entry["features"]
                mask = entry["mask"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise DataError(
                f"{path}: unreadable cache entry ({err}); delete the file and rerun"
            ) from err
        n = expected_mask.shape[0]
        if features.dtype != np.float32 or features.ndim != 2 or features.shape[0] != n:
            raise DataError(
                f"{path}: cache entry holds {features.dtype} {features.shape}, expected float32 [{n}, D]; "
                "delete the file and rerun"
            )
        if not np.array_equal(mask, expected_mask):
            raise DataError(
                f"{path}: cache entry's presence mask differs from the inputs'; delete the file and rerun"
            )
        return features

    def store(
        self, key: str, features: np.ndarray, mask: np.ndarray, identity: Mapping[str, Any]
    ) -> Path:
        """Write an entry atomically (temporary file, then :func:`os.replace`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path_for(key)
        meta = np.array(json.dumps(identity, sort_keys=True))
        with _temporary_file(self.root, final.name) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, features=features, mask=mask, identity=meta)
            os.replace(tmp, final)
        return final


@contextlib.contextmanager
def _temporary_file(folder: Path, name: str) -> Iterator[Path]:
    """A fresh, empty temporary file in ``folder``; removed on exit unless it was moved away.

    Created with the process umask (unlike :func:`tempfile.mkstemp`, whose files
    are private), so the final files get ordinary permissions.
    """
    while True:
        tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        try:
            with open(tmp, "xb"):
                break
        except FileExistsError:
            continue
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class ModalityResult:
    """Features of one modality for all items.

    Attributes
    ----------
    modality : str
        ``"text"`` or ``"image"``.
    features : np.ndarray
        ``float32 [N, D]``; zero rows where ``mask`` is False.
    mask : np.ndarray
        ``bool [N]``, True where the item has content.
    identity : dict
        The encoder's :meth:`~gfmfr_secure.encoders.registry.Encoder.identity`.
    input_sha256 : str
        Combined hash of the inputs.
    cache_key : str
        Key under which the matrix is (or would be) cached.
    cache_hit : bool
        Whether the matrix came from the cache.
    seconds : float
        Wall time spent, hashing included.
    """

    modality: str
    features: np.ndarray
    mask: np.ndarray
    identity: dict[str, Any]
    input_sha256: str
    cache_key: str
    cache_hit: bool
    seconds: float

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def n_missing(self) -> int:
        return int((~self.mask).sum())


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Set ``torch.set_num_threads`` for the block and restore it afterwards (no-op for None)."""
    if num_threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _presence(modality: str, items: Sequence[Any]) -> np.ndarray:
    if modality == "text":
        for k, item in enumerate(items):
            if item is not None and not isinstance(item, str):
                raise DataError(
                    f"text item {k}: expected a string or None, got {type(item).__name__}"
                )
        return np.array([item is not None and item.strip() != "" for item in items], dtype=bool)
    return np.array([item is not None for item in items], dtype=bool)


def encode_items(
    modality: str,
    items: Sequence[Any],
    encoder: Encoder,
    *,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: bool = True,
    num_threads: int | None = None,
) -> ModalityResult:
    """Encode every item of one modality, using and filling the cache.

    Parameters
    ----------
    modality : {"text", "image"}
    items : sequence
        ``N`` entries in item-index order: strings (``None`` or blank = no
        text) or image file paths (``None`` = no image).
    encoder : Encoder
        An encoder serving ``modality``.
    cache : FeatureCache, optional
        Cache to read and fill; None disables caching.
    batch_size : int
        Items per :meth:`Encoder.encode_batch` call.
    progress : bool
        Show a tqdm progress bar (stderr).
    num_threads : int, optional
        ``torch.set_num_threads`` during model work, restored afterwards;
        None leaves the current setting alone.

    Returns
    -------
    ModalityResult
        ``features`` ``float32 [N, D]``, ``mask`` ``bool [N]``.

    Raises
    ------
    DataError
        No item has content, an image file is unreadable, or the encoder
        returned a wrong shape or non-finite values.
    """
    from tqdm.auto import tqdm

    if modality not in encoder.modalities or encoder.modality != modality:
        raise ConfigError(
            f"encoder {encoder.name!r} was built for {encoder.modality!r}, not {modality!r}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if num_threads is not None and num_threads < 1:
        raise ConfigError(f"num_threads must be positive, got {num_threads}")
    start = time.perf_counter()
    items = list(items)
    n = len(items)
    mask = _presence(modality, items)
    inputs = [item if present else None for item, present in zip(items, mask, strict=True)]
    input_hash = hash_texts(inputs) if modality == "text" else hash_image_files(inputs)
    identity = encoder.identity()
    key = cache_key(identity, input_hash, n)

    cached = cache.load(key, mask) if cache is not None else None
    if cached is not None:
        return ModalityResult(
            modality, cached, mask, identity, input_hash, key, True, time.perf_counter() - start
        )

    present = np.flatnonzero(mask)
    if present.size == 0:
        raise DataError(
            f"no item has {modality} content ({n} items); disable this modality in the encoder config"
        )
    if modality == "text":  # longest first: batches of similar length pad less
        lengths = np.array([len(str(inputs[k])) for k in present])
        present = present[np.argsort(-lengths, kind="stable")]
    features: np.ndarray | None = None
    with (
        _torch_threads(num_threads),
        tqdm(
            total=int(present.size),
            desc=f"{modality} [{encoder.name}]",
            unit="item",
            disable=not progress,
        ) as bar,
    ):
        for lo in range(0, present.size, batch_size):
            rows = present[lo : lo + batch_size]
            out = np.asarray(encoder.encode_batch([inputs[k] for k in rows]))
            if out.ndim != 2 or out.shape[0] != rows.size:
                raise DataError(
                    f"encoder {encoder.name!r} returned shape {out.shape} for a batch of {rows.size} {modality} items"
                )
            if not np.isfinite(out).all():
                bad = int(rows[np.flatnonzero(~np.isfinite(out).all(axis=1))[0]])
                raise DataError(
                    f"encoder {encoder.name!r} returned non-finite values for {modality} item {bad}"
                )
            if features is None:
                features = np.zeros((n, out.shape[1]), dtype=np.float32)
            elif out.shape[1] != features.shape[1]:
                raise DataError(
                    f"encoder {encoder.name!r} returned {out.shape[1]} columns, earlier batches {features.shape[1]}"
                )
            features[rows] = out
            bar.update(int(rows.size))
    assert features is not None  # present.size > 0
    if cache is not None:
        cache.store(key, features, mask, identity)
    return ModalityResult(
        modality, features, mask, identity, input_hash, key, False, time.perf_counter() - start
    )


# --------------------------------------------------------------------------- output


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def write_outputs(
    out_dir: str | os.PathLike[str],
    results: Mapping[str, ModalityResult],
    header: Mapping[str, Any],
    extras: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``<modality>_feat.npy``, ``<modality>_mask.npy`` and ``manifest.json``.

    Every file is first written in full to a temporary file inside
    ``out_dir``; only then are they moved into place, the manifest last, so
    an interrupted run leaves no half-written file under a final name.

    Parameters
    ----------
    out_dir : path
        Output folder (created if needed).
    results : mapping
        Modality name -> :class:`ModalityResult`.
    header : mapping
        Top-level manifest fields (dataset description, ...).
    extras : mapping, optional
        Modality name -> extra fields for that modality's manifest section.

    Returns
    -------
    dict
        The manifest as written.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    extras = extras or {}
    manifest: dict[str, Any] = {
        "format": "gfmfr-secure item features",
        "format_version": MANIFEST_VERSION,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        **header,
        "modalities": {},
    }
    with contextlib.ExitStack() as stack:
        staged: list[tuple[Path, Path]] = []
        for modality, result in results.items():
            section = dict(result.identity)
            section["input"] = _INPUT_DESCRIPTION[modality]
            section["input_sha256"] = result.input_sha256
            section.update(
                dim=result.dim,
                n_items=int(result.mask.shape[0]),
                n_present=int(result.mask.sum()),
                n_missing=result.n_missing,
                cache={"key": result.cache_key, "hit": result.cache_hit},
                seconds=round(result.seconds, 3),
            )
            section.update(extras.get(modality, {}))
            files: dict[str, Any] = {}
            for role, array in (("features", result.features), ("mask", result.mask)):
                name = f"{modality}_{'feat' if role == 'features' else 'mask'}.npy"
                tmp = stack.enter_context(_temporary_file(folder, name))
                _save_npy(tmp, array)
                files[role] = {
                    "file": name,
                    "sha256": file_sha256(tmp),
                    "shape": list(array.shape),
                    "dtype": str(array.dtype),
                }
                staged.append((tmp, folder / name))
            section["files"] = files
            manifest["modalities"][modality] = section
        tmp_manifest = stack.enter_context(_temporary_file(folder, MANIFEST_NAME))
        tmp_manifest.write_text(
            json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8"
        )
        # Without a manifest the folder reads as incomplete until the last replace.
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
        for tmp, final in staged:
            os.replace(tmp, final)
        os.replace(tmp_manifest, folder / MANIFEST_NAME)
    return manifest


# --------------------------------------------------------------------------- entry points


def _check_out_dir(out_dir: Path, data_dir: Path | None) -> None:
    if data_dir is None:
        return
    out_abs, data_abs = out_dir.resolve(), data_dir.resolve()
    if out_abs == data_abs or data_abs in out_abs.parents:
        raise ConfigError(
            f"output folder {out_dir} lies inside the data folder {data_dir}, which is read-only; "
            "choose another --out"
        )


def _ids_sha256(item_ids: Sequence[Any]) -> str:
    return hashlib.sha256("\n".join(str(i) for i in item_ids).encode("utf-8")).hexdigest()


def encode_content(
    out_dir: str | os.PathLike[str],
    *,
    texts: Sequence[str | None] | None = None,
    image_paths: Sequence[str | os.PathLike[str] | None] | None = None,
    config: EncodeConfig | None = None,
    item_ids: Sequence[Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    cache: FeatureCache | None = None,
    progress: bool = True,
    num_threads: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    extras: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Encode plain item content and write the feature folder.

    Parameters
    ----------
    out_dir : path
        Output folder.
    texts : sequence of (str or None), optional
        ``N`` item strings in item order (required when the config enables text).
    image_paths : sequence of (path or None), optional
        ``N`` image files in item order (required when the config enables images).
    config : EncodeConfig, optional
        Encoders per modality; default :class:`EncodeConfig`.
    item_ids : sequence, optional
        ``N`` original item ids, hashed into the manifest.
    dataset : mapping, optional
        Description of the source (name, path, ...) copied into the manifest.
    cache : FeatureCache, optional
        Cache to use; None disables caching.
    progress : bool
        Show progress bars.
    num_threads : int, optional
        torch threads during model work.
    data_dir : path, optional
        The input data folder; the output must not lie inside it.
    extras : mapping, optional
        Extra manifest fields per modality.

    Returns
    -------
    dict
        The manifest written to ``out_dir/manifest.json``.

    Raises
    ------
    ConfigError
        Inputs missing for an enabled modality, lengths that disagree, or an
        output folder inside the data folder.
    DataError
        Unreadable inputs (see :func:`encode_items`).
    """
    config = config or EncodeConfig()
    out = Path(out_dir)
    _check_out_dir(out, Path(data_dir) if data_dir is not None else None)
    given: dict[str, Sequence[Any] | None] = {"text": texts, "image": image_paths}
    specs = config.specs()
    if not specs:
        raise ConfigError("the encoder config disables both text and image: nothing to encode")
    inputs: dict[str, list[Any]] = {}
    for modality in specs:
        values = given[modality]
        if values is None:
            raise ConfigError(
                f"the config enables {modality!r} but no {modality} inputs were given; "
                f"set '{modality}: null' in the encoder config to skip it"
            )
        inputs[modality] = list(values)
    lengths = {m: len(v) for m, v in inputs.items()}
    if item_ids is not None:
        lengths["item_ids"] = len(item_ids)
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"inputs disagree on the number of items: {lengths}")
    n_items = next(iter(lengths.values()))
    # Build (and so validate) every encoder before any model work.
    encoders = {m: spec.build(m) for m, spec in specs.items()}
    results = {
        m: encode_items(
            m,
            inputs[m],
            encoders[m],
            cache=cache,
            batch_size=specs[m].batch_size,
            progress=progress,
            num_threads=num_threads,
        )
        for m in specs
    }
    header: dict[str, Any] = {
        "dataset": {
            **dict(dataset or {}),
            "n_items": n_items,
            **({"item_ids_sha256": _ids_sha256(item_ids)} if item_ids is not None else {}),
        },
        "item_order": "row k belongs to item index k of the dataset",
    }
    return write_outputs(out, results, header, extras)


def default_out_dir(dataset_name: str) -> Path:
    """``./features/<dataset_name>`` (relative to the working directory)."""
    return Path("features") / dataset_name


def encode_dataset(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    config: EncodeConfig | None = None,
    *,
    cache: FeatureCache | None = None,
    progress: bool = True,
    num_threads: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Encode the items of a dataset folder (the ``encode`` command).

    Parameters
    ----------
    data_dir : path
        Dataset folder read with :func:`gfmfr_secure.data.load_dataset`; it is
        never written.
    out_dir : path, optional
        Output folder; default ``./features/<dataset name>``.
    config : EncodeConfig, optional
        Encoders per modality; default :class:`EncodeConfig`.
    cache : FeatureCache, optional
        Cache to use; None disables caching.
    progress : bool
        Show progress bars.
    num_threads : int, optional
        torch threads during model work.

    Returns
    -------
    (Path, dict)
        The output folder and the manifest written there.

    Raises
    ------
    DataError
        The dataset lacks the item table (text) or image paths (images) an
        enabled modality needs, or its content is unreadable.
    """
    from gfmfr_secure.data import load_dataset

    config = config or EncodeConfig()
    data_path = Path(data_dir)
    data = load_dataset(data_path)
    out = Path(out_dir) if out_dir is not None else default_out_dir(data.name)
    specs = config.specs()
    texts: list[str] | None = None
    extras: dict[str, dict[str, Any]] = {}
    if "text" in specs:
        if data.item_table is None:
            raise DataError(
                f"{data_path}: the dataset has no item table (titles, genres, overviews) to encode; "
                "set 'text: null' in the encoder config to skip text"
            )
        texts = item_texts(data.item_table, source=f"{data_path} item table")
        if "overview" in data.item_table.columns:
            extras["text"] = {"n_without_overview": int(data.item_table["overview"].isna().sum())}
    image_paths: tuple[Path | None, ...] | None = None
    if "image" in specs:
        if data.image_paths is None:
            raise DataError(
                f"{data_path}: the dataset has no item images (no posters folder); "
                "set 'image: null' in the encoder config to skip images"
            )
        image_paths = tuple(data.image_paths)
    manifest = encode_content(
        out,
        texts=texts,
        image_paths=image_paths,
        config=config,
        item_ids=data.item_map.ids.tolist(),
        dataset={"name": data.name, "path": str(data_path.resolve())},
        cache=cache,
        progress=progress,
        num_threads=num_threads,
        data_dir=data_path,
        extras=extras,
    )
    return out, manifest
