"""Serving many tasks from one backbone: ``MultiTaskModel``, mixed-task batches and ``deltatune serve``."""

from deltatune.serve.multitask import MultiTaskModel, Task

__all__ = ["MultiTaskModel", "Task"]
