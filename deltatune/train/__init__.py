"""The training loop behind ``deltatune train``: loop, config, state, phases, distributed runtime, report."""
