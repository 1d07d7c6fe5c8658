"""The README's commands: every ``deltatune`` line in its shell blocks parses, and every ``train`` line builds a
valid TrainConfig (options, recipe, ranges), so the README cannot drift from the CLI. Lines that finish in under a
minute run for real elsewhere (the demo's quick mode in test_cli, the offline recipes in test_recipes)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from deltatune.cli import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """Each ``deltatune ...`` command in the README's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "deltatune" in words:
                words = words[words.index("deltatune") + 1 :]
                if words and "--help" not in words:
                    commands.append(shlex.join(words))
    return commands


COMMANDS = readme_commands()


def test_the_readme_names_the_commands_users_run() -> None:
    kinds = {c.split()[0] for c in COMMANDS}
    assert {"demo", "train", "bench", "predict"} <= kinds, kinds


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # recipes/ paths are relative to the repository
    words = [w for w in shlex.split(command) if w != "..."]
    if "--config" in words and words[words.index("--config") + 1 :][:1] == []:
        pytest.fail(f"README command {command!r} names --config without a file")
    ns = build_parser().parse_args(words)
    if ns.command == "train":
        cfg = config_from_args(ns)  # every option checked: types, ranges, the recipe's keys
        assert cfg.method
