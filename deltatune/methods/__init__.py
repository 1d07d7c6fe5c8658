"""Every registered method: importing this package registers them all (one import line per method file)."""

from deltatune.methods import (  # noqa: F401
    adapter,
    adaptformer,
    fact,
    ia3,
    lora,
    mimi,
    partial,
    phm,
    prefix,
    prompt,
    selection,
    ssf,
    vpt,
)
