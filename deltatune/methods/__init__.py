"""Every registered method: importing this package registers them all (one import line per method file)."""

from deltatune.methods import adapter, lora, mimi, selection, ssf  # noqa: F401
