"""The public surface: ``novita_async.__all__`` is exactly what users may import."""

from __future__ import annotations

import inspect
import types

import novita_async as na

_FOREIGN_PACKAGES = ("aiohttp", "tenacity", "anyio", "multidict", "yarl")


def _public_names() -> set[str]:
    """Names bound in the package that are neither private nor submodules."""
    return {
        name
        for name, value in vars(na).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_all_is_exactly_the_public_names() -> None:
    """__all__ lists every public name bound in the package and nothing else."""
    assert set(na.__all__) == _public_names() | {"__version__"}


def test_all_has_no_private_names() -> None:
    """No name in __all__ starts with an underscore, except __version__."""
    assert [name for name in na.__all__ if name.startswith("_")] == ["__version__"]


def test_all_is_sorted_without_duplicates() -> None:
    """__all__ is sorted (case-sensitively) and has no duplicates."""
    assert na.__all__ == sorted(set(na.__all__))


def test_every_name_is_importable() -> None:
    """Every name in __all__ resolves with ``from novita_async import *``."""
    namespace: dict[str, object] = {}
    exec("from novita_async import *", namespace)
    assert set(na.__all__) <= set(namespace)
    for name in na.__all__:
        assert namespace[name] is getattr(na, name)


def test_version_is_a_string() -> None:
    """__version__ is a non-empty dotted version string."""
    assert isinstance(na.__version__, str)
    assert na.__version__.split(".")[0].isdigit()


def test_no_third_party_types_exported() -> None:
    """No exported class is, or derives from, an aiohttp/tenacity/anyio type."""
    for name in na.__all__:
        value = getattr(na, name)
        module = getattr(value, "__module__", None) or ""
        if callable(value) or inspect.isclass(value):
            assert module.startswith("novita_async"), (name, module)
        if inspect.isclass(value):
            for base in value.__mro__:
                assert not base.__module__.startswith(_FOREIGN_PACKAGES), (name, base)


def test_every_error_derives_from_novita_error() -> None:
    """Every exported exception class is a NovitaError."""
    errors = [
        getattr(na, name) for name in na.__all__
        if inspect.isclass(getattr(na, name)) and issubclass(getattr(na, name), BaseException)
    ]
    assert na.NovitaError in errors
    for error in errors:
        assert issubclass(error, na.NovitaError), error
