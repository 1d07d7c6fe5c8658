"""Registry of delta-tuning methods: a name maps to its config dataclass.

Adding a method touches its own file (decorated with ``@register``), one import line in
``deltatune/methods/__init__.py`` and its tests; nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from deltatune.errors import DeltaTuneError

_METHODS: dict[str, type] = {}
C = TypeVar("C", bound=type)


def register(name: str):
    """Class decorator: registers a method config dataclass under ``name``."""

    def wrap(cls: C) -> C:
        if name in _METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def require(config: Any, ok: bool, option: str, rule: str) -> None:
    """Raises a DeltaTuneError naming the method, the option, its rule and the value given, unless ``ok``."""
    if not ok:
        raise DeltaTuneError(f"{config.name}: {option} must be {rule}, got {getattr(config, option)!r}")


def methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)


def config_class(name: str) -> type:
    """The config dataclass registered under ``name``."""
    if name not in _METHODS:
        raise DeltaTuneError(f"unknown method {name!r}; registered methods: {', '.join(methods())}")
    return _METHODS[name]


def make_config(method: Any, **options: Any) -> Any:
    """A config object from a registered name (options override its defaults) or a config object."""
    if isinstance(method, str):
        cls = config_class(method)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise DeltaTuneError(
                f"unknown option(s) {unknown} for method {method!r}; its options are: {', '.join(sorted(fields))}"
            )
        return cls(**options)
    if dataclasses.is_dataclass(method) and getattr(type(method), "name", None) in _METHODS:
        if options:
            return dataclasses.replace(method, **options)
        return method
    raise DeltaTuneError(
        f"method must be a registered name or a deltatune config object, got {type(method).__name__}; "
        f"registered methods: {', '.join(methods())}"
    )


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready description of a config: its method name and every option."""
    return {"method": config.name, "options": dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of ``config_to_dict``."""
    return make_config(data["method"], **data["options"])
