"""Every registered method: importing this package registers them all (one import line per method file)."""

from deltatune.methods import adapter, adaptformer, fact, lora, mimi, partial, phm, prefix, prompt, selection, ssf, vpt  # noqa: F401
