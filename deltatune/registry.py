"""Registry of delta-tuning methods: a name maps to its config dataclass.

Adding a method touches its own file (decorated with ``@register``), one import line in
``deltatune/methods/__init__.py`` and its tests; nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

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
        _validate_before_post_init(cls)
        return cls

    return wrap


def require(config: Any, ok: bool, option: str, rule: str) -> None:
    """Raises a DeltaTuneError naming the method, the option, its rule and the value given, unless ``ok``."""
    if not ok:
        raise DeltaTuneError(f"{config.name}: {option} must be {rule}, got {getattr(config, option)!r}")


def config_classes() -> list[type]:
    """Every registered config class, by method name (the package exports them by class name)."""
    return [_METHODS[name] for name in sorted(_METHODS)]


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
            return make_config(method.name, **{**_options(method), **options})
        return method
    raise DeltaTuneError(
        f"method must be a registered name or a deltatune config object, got {type(method).__name__}; "
        f"registered methods: {', '.join(methods())}"
    )


def _options(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready description of a config: its method name and every option."""
    return {"method": config.name, "options": dataclasses.asdict(config)}


def config_from_dict(data: Any) -> Any:
    """Inverse of ``config_to_dict``; anything malformed (a file's metadata) raises DeltaTuneError."""
    well_formed = isinstance(data, dict) and isinstance(data.get("method"), str)
    if not well_formed or not isinstance(data.get("options"), dict):
        raise DeltaTuneError(
            f"a method entry must be {{'method': name, 'options': {{...}}}}, got {_short(data)}; the file is corrupt"
        )
    if not all(isinstance(k, str) for k in data["options"]):
        raise DeltaTuneError(f"method {data['method']!r}: option names must be strings, got {_short(data['options'])}")
    return make_config(data["method"], **data["options"])


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- option types: every config is checked against its field annotations before its own __post_init__ runs ----


def _validate_before_post_init(cls: type) -> None:
    """Makes every construction of ``cls`` check each field's type first (DeltaTuneError, never a TypeError later).

    A dataclass calls ``__post_init__`` only if it had one when it was made; otherwise ``__init__`` is wrapped.
    """
    if not hasattr(cls, "__post_init__"):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            validate_options(self)

        cls.__init__ = __init__
        return
    post_init = cls.__post_init__

    @functools.wraps(post_init)
    def __post_init__(self: Any) -> None:
        validate_options(self)
        post_init(self)

    cls.__post_init__ = __post_init__


def validate_options(config: Any) -> None:
    """Checks each field of a config against its annotation; ints given for floats become floats."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if not _fits(value, hint):
            raise DeltaTuneError(
                f"{config.name}: option {f.name} must be {_describe(hint)}, got {_short(value)} "
                f"({type(value).__name__})"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise DeltaTuneError(f"{config.name}: option {f.name} must be a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and float in _arms(hint) and int not in _arms(hint):
            setattr(config, f.name, float(value))
        if isinstance(value, str) and f.name.endswith("_modules"):
            check_pattern(config.name, f.name, value)


def _arms(hint: Any) -> tuple[Any, ...]:
    return get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the annotated type: bool is not an int, an int is a float, containers checked deeply."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    """Readable form of an annotation: ``int or None``, ``str or list of str``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s"
    if origin is dict:
        return f"a dict of {_describe(args[0])} to {_describe(args[1])}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "None"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


MAX_PATTERN = 500
"""Longest module-name regex accepted (module names are short; longer patterns are not site selections)."""


def check_pattern(method: str, option: str, pattern: str) -> None:
    """Refuses a regex that does not compile or could backtrack for minutes on a module name.

    Module names are at most a few hundred characters, so a pattern whose paths hold at most three unbounded
    repeats, none nested inside another and none over alternatives, matches in well under a millisecond.
    """
    fix = f"name the modules as a list instead, e.g. {option}=['attn.qkv', 'mlp.fc1']"
    if len(pattern) > MAX_PATTERN:
        raise DeltaTuneError(f"{method}: {option} regex is {len(pattern)} characters (limit {MAX_PATTERN}); {fix}")
    try:
        parsed = _sre_parse(pattern)
        depth = _repeat_depth(parsed, in_repeat=False)
    except re.error as e:
        raise DeltaTuneError(f"{method}: {option}={pattern!r} is not a valid regular expression ({e}); {fix}") from e
    except (_Risky, RecursionError) as e:
        raise DeltaTuneError(
            f"{method}: {option}={pattern!r} nests repeats (like '(a+)+') or repeats alternatives, which can make "
            f"matching take exponential time; {fix}"
        ) from e
    if depth > 3:
        raise DeltaTuneError(
            f"{method}: {option}={pattern!r} has {depth} unbounded repeats in a row (at most 3, matching time grows "
            f"with their power); {fix}"
        )


class _Risky(Exception):
    """A regex shape that can backtrack exponentially."""


def _sre_parse(pattern: str) -> Any:
    import re._parser as sre_parse  # Python >= 3.11

    return sre_parse.parse(pattern)


def _repeat_depth(items: Any, in_repeat: bool) -> int:
    """The most unbounded repeats along one path of a parsed regex; raises _Risky for nested or alternated repeats."""
    import re._constants as c

    total = 0
    for op, arg in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            _, high, body = arg
            unbounded = high == c.MAXREPEAT or high > 10
            if unbounded and (in_repeat or _has_branch(body)):
                raise _Risky
            inner = _repeat_depth(body, in_repeat or unbounded)
            total += inner + 1 if unbounded else inner * high
        elif op in (c.SUBPATTERN, c.ATOMIC_GROUP, c.ASSERT, c.ASSERT_NOT):
            total += _repeat_depth(arg[-1], in_repeat)
        elif op == c.BRANCH:
            total += max(_repeat_depth(b, in_repeat) for b in arg[1])
    return total


def _has_branch(items: Any) -> bool:
    import re._constants as c

    return any(op == c.BRANCH or (op == c.SUBPATTERN and _has_branch(arg[-1])) for op, arg in items)
