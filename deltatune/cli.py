"""The ``deltatune`` command: ``train`` (one run, from options and/or a YAML recipe) and ``demo`` (offline tour).

    deltatune demo                                        # every method on the bundled offline ViT, in minutes
    deltatune train --config recipes/ssf_cifar100.yaml    # a recipe; any option can be overridden:
    deltatune train --config recipes/ssf_cifar100.yaml --lr 5e-4 --epochs 10
    deltatune predict runs/ssf-20250101-120000 photos/ --top-k 3   # a run folder (or a delta file) on images
    torchrun --nproc_per_node 4 -m deltatune.cli train --config recipes/ssf_cifar100.yaml   # DDP

Every ``train`` option is a ``TrainConfig`` field; its help text is the field's docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from deltatune.errors import DeltaTuneError
from deltatune.registry import methods
from deltatune.train.config import SECTIONS, TrainConfig, field_docs


def _metavar(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    return {int: "INT", float: "FLOAT", dict: "YAML", list: "NAMES", bool: "BOOL"}.get(origin, "TEXT")


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "none" if f.default is None else str(f.default)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, grouped by section; unset options stay out of the namespace."""
    parser.add_argument(
        "--config",
        metavar="YAML",
        default=argparse.SUPPRESS,
        help="YAML recipe whose keys are the options below; options given here override it",
    )
    docs, hints = field_docs(), typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for section, names in SECTIONS.items():
        group = parser.add_argument_group(section)
        for name in names:
            f, flag = fields[name], "--" + name.replace("_", "-")
            help_text = docs.get(name, "")
            if name == "method":
                help_text += f" Registered: {', '.join(methods())}."
            if "default:" not in help_text:
                help_text += f" (default: {_default_text(f)})"
            help_text = help_text.replace("%", "%%")
            if bool in (hints[name], *typing.get_args(hints[name])):
                group.add_argument(
                    flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
                )
            else:
                group.add_argument(
                    flag, dest=name, metavar=_metavar(hints[name]), default=argparse.SUPPRESS, help=help_text
                )


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Defaults, then the YAML file, then the command line."""
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "func")}
    path = getattr(ns, "config", None)
    return TrainConfig.from_yaml(path, given) if path else TrainConfig.from_dict(given)


def _run_train(ns: argparse.Namespace) -> int:
    from deltatune.train.loop import train

    train(config_from_args(ns))
    return 0


def _run_demo(ns: argparse.Namespace) -> int:
    from deltatune.demo import run_demo

    run_demo(**{k: v for k, v in vars(ns).items() if k not in ("command", "func")})
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``deltatune`` command."""
    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Parameter-efficient (delta) tuning of pretrained transformers.",
        epilog="Run `deltatune demo` first: it trains every method on a bundled offline backbone in a few minutes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = sub.add_parser(
        "train",
        help="train one model (a delta-tuning method on a backbone and dataset)",
        description="Train a delta-tuning method. Options come from the field defaults, then --config YAML, then "
        "the command line. Under torchrun the same command trains with DistributedDataParallel.",
    )
    add_train_arguments(train)
    train.set_defaults(func=_run_train)
    from deltatune.demo import add_demo_arguments

    demo = sub.add_parser(
        "demo",
        help="train every method on the bundled offline ViT and compare them (CPU, a few minutes)",
        description="Trains linear probe, BitFit, SSF, LoRA, adapter and full fine-tuning on the offline backbone "
        "and an offline task, then prints and saves the comparison table, delta files and a plot.",
    )
    add_demo_arguments(demo)
    demo.set_defaults(func=_run_demo)
    from deltatune.bench.cli import add_parser as add_bench

    add_bench(sub)  # deltatune bench: step time, memory and merged inference vs full FT and the floor
    from deltatune.predict import add_parser as add_predict

    add_predict(sub)  # deltatune predict: top-k class names for images or texts with a trained delta
    from deltatune.serve.server import add_parser as add_serve

    add_serve(sub)  # deltatune serve: many tasks on one backbone over HTTP
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deltatune`` command; returns the exit status (2 for a user error)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except DeltaTuneError as e:
        print(f"deltatune {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
