"""Reading training options: the docstrings under dataclass fields (the CLI help), YAML values, type coercion, and
the options that registered methods declare (``protocols.TrainOptions``: MiMi's --rho, --prune-score, ...)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from deltatune.errors import DeltaTuneError
from deltatune.registry import config_class, methods


def flag(name: str) -> str:
    """The command-line flag of an option: ``prune_score`` -> ``--prune-score``."""
    return "--" + name.replace("_", "-")


def method_options() -> dict[str, tuple[type, str]]:
    """Training options that set a registered method's config field: option -> (config class, field)."""
    out: dict[str, tuple[type, str]] = {}
    for name in methods():
        cls = config_class(name)
        for option, field_name in (cls.__dict__.get("cli_options") or {}).items():
            out.setdefault(option, (cls, field_name))
    return out


def method_option_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """``make_dataclass`` fields for the methods' training options: the config field's type or None (the method's
    own default), each documented by the config field's docstring."""
    out = []
    for option, (cls, name) in method_options().items():
        hint = typing.get_type_hints(cls)[name]
        default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
        doc = f"{cls.name}: {source_docs(cls).get(name, '')} none: the method's ({default})."
        out.append((option, hint | None, dataclasses.field(default=None, metadata={"doc": doc})))
    return out


def method_sections() -> dict[str, list[str]]:
    """The ``--help`` section of each method's training options."""
    sections: dict[str, list[str]] = {}
    for option, (cls, _) in method_options().items():
        sections.setdefault(f"{cls.cli_group} (--method {cls.name})", []).append(option)
    return sections


@cache
def source_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, joined into one line (read from the source with ``ast``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else None
        if is_field and isinstance(doc, str):
            docs[node.target.id] = " ".join(doc.split())
    return docs


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise DeltaTuneError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DeltaTuneError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise DeltaTuneError(f"config file {str(path)!r} must hold a mapping of option: value")
    return data


def coerce(name: str, value: Any, hint: Any) -> Any:
    """Converts ``value`` (possibly a string from YAML or the command line) to the field's type."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message
            return coerce(name, value, options[0])
        for arg in options:
            try:
                return coerce(name, value, arg)
            except DeltaTuneError:
                continue
        raise DeltaTuneError(f"{name}: cannot read {value!r} as {hint}")
    origin = typing.get_origin(hint) or hint
    if isinstance(value, str) and origin in (dict, list, bool):
        value = _parse_yaml_value(name, value)
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise DeltaTuneError(f"{name}: expected true or false, got {value!r}")
    if origin in (int, float):
        if isinstance(value, bool):  # YAML reads true/yes/on as a boolean, which int() would take as 1
            raise DeltaTuneError(f"{name}: expected a number, got the boolean {value!r}; set {flag(name)} to a number")
        try:
            number = origin(value)
        except (TypeError, ValueError, OverflowError):
            raise DeltaTuneError(f"{name}: expected a number, got {value!r}") from None
        if origin is int and isinstance(value, float) and number != value:
            raise DeltaTuneError(f"{name}: expected an integer, got {value!r}")
        if not math.isfinite(number):
            raise DeltaTuneError(f"{name}: expected a finite number, got {value!r}; set {flag(name)} to a real value")
        return number
    if origin is str:
        if isinstance(value, str):
            return value
        raise DeltaTuneError(f"{name}: expected text, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        raise DeltaTuneError(f"{name}: expected a list of names, got {value!r}")
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise DeltaTuneError(f'{name}: expected a mapping like "{{key: value}}", got {value!r}')
    return value


def _parse_yaml_value(name: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DeltaTuneError(f"{name}: cannot parse {text!r} as YAML ({e})") from e


# create_backbone's own arguments: model_kwargs may not set them behind the options that do.
RESERVED_MODEL_KWARGS = {
    "img_size": "--img-size",
    "num_classes": "the dataset (its number of classes)",
    "pretrained": "--pretrained / --no-pretrained",
    "checkpoint": "--checkpoint",
    "pretrained_cfg_overlay": "--checkpoint",
    "name": "--model",
}


def check_choice(name: str, value: str, choices: Any) -> None:
    """Refuses a value not among ``choices``, naming the option and them."""
    if value not in choices:
        raise DeltaTuneError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_model_kwargs(kwargs: dict[str, Any]) -> None:
    """model_kwargs names timm.create_model arguments: text keys, none that another option sets."""
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise DeltaTuneError(f"model_kwargs: {key!r} is not an argument name; write it as {{name: value}}")
        if key in RESERVED_MODEL_KWARGS:
            raise DeltaTuneError(
                f"model_kwargs: {key}={kwargs[key]!r} is set by {RESERVED_MODEL_KWARGS[key]}, not by model_kwargs;"
                f" remove it from --model-kwargs" + (f" and pass --img-size {kwargs[key]}" if key == "img_size" else "")
            )
