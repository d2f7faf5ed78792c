"""The secure-aggregation packages are split by role, and the server role never reaches the client role.

Two checks: a static walk of the ``import`` statements from each server module through
the library (a module's own imports, transitively; package ``__init__`` files only
re-export), and a fresh interpreter that imports the server module and looks at
``sys.modules``. Also: the re-exports of the package names, and the CKKS primes are
SEAL's (``CoeffModulus.Create``), with the properties SEAL promises.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import gfmfr_secure

ROOT = Path(gfmfr_secure.__file__).resolve().parent


def _module_file(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None or spec.origin is None else Path(spec.origin)


def _library_imports(name: str) -> set[str]:
    """The ``gfmfr_secure`` modules a module imports itself (``from a.b import c`` counts ``a.b.c`` when it is a module)."""
    path = _module_file(name)
    if path is None or path.suffix != ".py":
        return set()
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("gfmfr_secure."):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}"))
    return {m for m in found if m.startswith("gfmfr_secure.")}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def reachable(start: str) -> set[str]:
    """Every library module reachable from ``start`` through import statements."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_library_imports(name) - seen)
    return seen


@pytest.mark.parametrize(
    ("server", "forbidden"),
    [
        ("gfmfr_secure.secagg.masking.server", {"gfmfr_secure.secagg.masking.client", "gfmfr_secure.secagg.masking.driver"}),
        (
            "gfmfr_secure.secagg.ckks.server",
            {"gfmfr_secure.secagg.ckks.client", "gfmfr_secure.secagg.ckks.keyholder", "gfmfr_secure.secagg.ckks.driver"},
        ),
    ],
)
def test_server_role_does_not_import_the_client_role(server: str, forbidden: set[str]) -> None:
    reached = reachable(server)
    assert server in reached and len(reached) > 3  # the walk did follow the imports
    assert not reached & forbidden
    assert not any(m.startswith(("gfmfr_secure.client", "gfmfr_secure.server")) for m in reached)
    code = f"import sys, {server}; print(sorted(m for m in sys.modules if m.startswith('gfmfr_secure.')))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120).stdout
    assert not any(f"'{m}'" in loaded for m in forbidden), loaded


def test_the_walk_sees_a_forbidden_import() -> None:
    """The check can fail: the driver does reach the client role."""
    assert "gfmfr_secure.secagg.masking.client" in reachable("gfmfr_secure.secagg.masking.driver")
    assert "gfmfr_secure.secagg.ckks.client" in reachable("gfmfr_secure.secagg.ckks.driver")


@pytest.mark.parametrize("package", ["gfmfr_secure.secagg.masking", "gfmfr_secure.secagg.ckks"])
def test_every_public_name_is_importable_from_the_package(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        assert value is not None
        owner = getattr(value, "__module__", None)
        if owner is not None and owner != "typing":
            assert owner.startswith(package + "."), (name, owner)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    ("degree", "bits"), [(4096, (60, 49)), (4096, (34, 34, 41)), (4096, (36, 36, 37)), (8192, (60, 40, 40, 60)), (2048, (27, 27))]
)
def test_ckks_primes_are_seals(degree: int, bits: tuple[int, ...]) -> None:
    pytest.importorskip("tenseal")
    from tenseal import sealapi

    from gfmfr_secure.secagg.ckks import CKKSParams

    primes = CKKSParams(degree, bits, 20, max_summands=1).primes
    assert primes == tuple(int(m.value()) for m in sealapi.CoeffModulus.Create(degree, list(bits)))
    assert len(set(primes)) == len(bits)
    for p, b in zip(primes, bits, strict=True):
        assert p.bit_length() == b and p % (2 * degree) == 1 and pow(3, p - 1, p) == 1  # NTT-friendly, b bits, prime (Fermat)
