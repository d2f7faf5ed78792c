"""The encoder interface and the registry that names its implementations.

An encoder turns a batch of item contents (strings for ``"text"``, image file
paths for ``"image"``) into a float32 matrix ``[B, D]``. Everything around it
(missing items, batching, progress, caching, output files) belongs to
:mod:`gfmfr_secure.encoders.pipeline`, so an encoder only does model work.

Implementations register themselves by name::

    @register_encoder("my-encoder")
    class MyEncoder(Encoder):
        modalities = ("text",)
        option_names = ("path",)
        ...

and are built from a name, a modality and options (the keys of a YAML
config section)::

    encoder = build_encoder("minilm", "text", {})

The registry raises on a duplicate or unknown name and lists the known ones.
Heavy libraries (torch, transformers, sentence-transformers, PIL) are imported
only inside the methods that do model work, so building an encoder and asking
for its identity (the input of the cache key) stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import numpy as np

from gfmfr_secure.errors import ConfigError

__all__ = [
    "MODALITIES",
    "Encoder",
    "available_encoders",
    "build_encoder",
    "folder_fingerprint",
    "force_offline",
    "get_encoder",
    "import_optional",
    "package_versions",
    "register_encoder",
]

#: Modalities an encoder can serve.
MODALITIES = ("text", "image")

#: What to install when an optional dependency is missing.
INSTALL_HINT = "install the encoder extras: pip install 'gfmfr-secure[encoders]'"

_REGISTRY: dict[str, type[Encoder]] = {}
_BUILTIN_MODULES = ("gfmfr_secure.encoders.text", "gfmfr_secure.encoders.image")

E = TypeVar("E", bound="type[Encoder]")


class Encoder(ABC):
    """Base class of item-content encoders.

    Subclasses declare the modalities they serve and the option names they
    accept; :func:`build_encoder` checks both before calling the constructor
    ``cls(modality, **options)``. A model is loaded lazily on the first call
    of :meth:`encode_batch`, never in the constructor.

    Attributes
    ----------
    name : str
        Registry name, set by :func:`register_encoder`.
    modalities : tuple of str
        Subset of :data:`MODALITIES` the encoder can serve.
    option_names : tuple of str
        Keyword options the constructor accepts.
    modality : str
        The modality this instance serves.
    """

    name: ClassVar[str] = ""
    modalities: ClassVar[tuple[str, ...]] = ()
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ConfigError(
                f"encoder {self.name!r} cannot encode {modality!r}; it serves: "
                f"{', '.join(self.modalities)}"
            )
        self.modality = modality

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-serialisable description of everything that determines the output.

        It holds the encoder name, the versions of the packages involved
        (``importlib.metadata``), a fingerprint of the model weights and the
        preprocessing recipe. It goes into the manifest and, hashed together
        with the inputs, forms the cache key. It must not load the model.
        """

    @abstractmethod
    def encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        """Encode one batch of present items.

        Parameters
        ----------
        items : sequence
            ``B`` non-empty strings (text) or image file paths (image).

        Returns
        -------
        np.ndarray
            ``float32 [B, D]``.
        """


def register_encoder(name: str) -> Callable[[E], E]:
    """Class decorator adding an :class:`Encoder` subclass to the registry.

    Parameters
    ----------
    name : str
        Name used in configs (``encoder: <name>``).

    Raises
    ------
    ValueError
        If ``name`` is already registered (the known names are listed), or the
        class declares no valid modalities.
    TypeError
        If the decorated object is not an :class:`Encoder` subclass.
    """

    def decorate(cls: E) -> E:
        if not (isinstance(cls, type) and issubclass(cls, Encoder)):
            raise TypeError(f"encoder {name!r}: {cls!r} is not an Encoder subclass")
        if name in _REGISTRY:
            raise ValueError(
                f"encoder {name!r} is already registered (by {_REGISTRY[name].__qualname__}); "
                f"known encoders: {', '.join(sorted(_REGISTRY))}"
            )
        unknown = [m for m in cls.modalities if m not in MODALITIES]
        if not cls.modalities or unknown:
            raise ValueError(
                f"encoder {name!r}: modalities must be a non-empty subset of {MODALITIES}, "
                f"got {cls.modalities!r}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def get_encoder(name: str) -> type[Encoder]:
    """The encoder class registered under ``name``.

    Raises
    ------
    ConfigError
        If no encoder has that name; the message lists the known names.
    """
    _load_builtins()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown encoder {name!r}; known encoders: {', '.join(sorted(_REGISTRY))}"
        )
    return cls


def available_encoders() -> dict[str, tuple[str, ...]]:
    """Registered encoder names mapped to the modalities each serves."""
    _load_builtins()
    return {name: cls.modalities for name, cls in sorted(_REGISTRY.items())}


def build_encoder(name: str, modality: str, options: Mapping[str, Any] | None = None) -> Encoder:
    """Instantiate the encoder ``name`` for ``modality`` with ``options``.

    Parameters
    ----------
    name : str
        Registered encoder name.
    modality : {"text", "image"}
    options : mapping, optional
        Keyword options; each must be one of the class's ``option_names``.

    Raises
    ------
    ConfigError
        Unknown name or modality, a modality the encoder does not serve, or an
        unknown option (the accepted ones are listed).
    """
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
    cls = get_encoder(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(cls.option_names))
    if unknown:
        accepted = ", ".join(cls.option_names) or "(none)"
        raise ConfigError(
            f"encoder {name!r}: unknown option(s) {', '.join(unknown)}; accepted: {accepted}"
        )
    return cls(modality, **options)


# --------------------------------------------------------------------------- helpers for encoders


def package_versions(*distributions: str) -> dict[str, str]:
    """Installed versions of ``distributions`` (PyPI names), read from package metadata.

    Raises
    ------
    ImportError
        If one is not installed; the message says what to install.
    """
    versions: dict[str, str] = {}
    for dist in distributions:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError as err:
            raise ImportError(f"package {dist!r} is not installed; {INSTALL_HINT}") from err
    return versions


def import_optional(module: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise an :class:`ImportError` that says what to install.

    Parameters
    ----------
    module : str
        Dotted module name, e.g. ``"sentence_transformers"``.
    purpose : str
        What it is needed for, quoted in the message.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ImportError(f"{purpose} needs the module {module!r} ({err}); {INSTALL_HINT}") from err


def force_offline() -> None:
    """Forbid Hugging Face libraries from reaching the network in this process.

    Encoders load local folders only; these variables make any accidental hub
    look-up fail instead of downloading. Call before importing transformers or
    sentence-transformers.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


#: Files up to this size are hashed whole by :func:`folder_fingerprint`.
_FULL_HASH_LIMIT = 64 * 2**20
_EDGE = 2**20


def folder_fingerprint(folder: str | os.PathLike[str]) -> str:
    """Content fingerprint (sha256 hex) of a model folder.

    Every regular file under ``folder`` contributes its relative path and size;
    files up to 64 MiB contribute their whole content, larger ones their first
    and last MiB (hashing gigabytes of weights on every run would defeat the
    cache). The folder's own location does not enter the fingerprint.

    Raises
    ------
    ConfigError
        If ``folder`` is not a directory or holds no files.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"model folder {str(root)!r} is not an existing directory")
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise ConfigError(f"model folder {str(root)!r} holds no files")
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                for chunk in iter(lambda: fh.read(2**20), b""):
                    digest.update(chunk)
            else:
                digest.update(fh.read(_EDGE))
                fh.seek(size - _EDGE)
                digest.update(fh.read(_EDGE))
    return digest.hexdigest()
