"""Experiment tracking for the trainer: TensorBoard (``--tensorboard``, event files in ``<run>/tb``) and Weights &
Biases (``--wandb``), both optional and off by default; ``log.jsonl`` is always written.

Scalars: ``train/loss`` and ``train/lr`` every step; every ``log.jsonl`` number per epoch under ``epoch/<key>``
(``epoch/train_loss``, ``epoch/eval_top1``, ...) at the epoch's number. Figures (the demo's accuracy against
trainable parameters) go in as images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltatune.errors import DeltaTuneError

TB_DIR = "tb"
WANDB_PROJECT = "deltatune"


class Tracker:
    """Sends scalars and figures to the enabled backends; with none enabled every call does nothing."""

    def __init__(self, out: str | Path, tensorboard: bool = False, wandb: bool = False, config: dict | None = None):
        self.tb, self.wandb = None, None
        if tensorboard:
            self.tb = _tensorboard_writer(Path(out) / TB_DIR)
        if wandb:
            self.wandb = _wandb_run(Path(out), config or {})

    @classmethod
    def for_run(cls, cfg: Any, is_main: bool) -> Tracker:
        """The tracker of a training run: only rank 0 logs."""
        if not is_main:
            return cls(cfg.output_dir)
        return cls(cfg.output_dir, cfg.tensorboard, cfg.wandb, cfg.to_dict())

    def step(self, step: int, loss: float, lr: float) -> None:
        """Per optimizer step (1-based): the batch's loss and the learning rate it used."""
        self._scalars({"train/loss": loss, "train/lr": lr}, step)

    def epoch(self, record: dict[str, Any]) -> None:
        """Per epoch: every number of its log.jsonl record, at the epoch's number."""
        values = {f"epoch/{k}": v for k, v in record.items() if k != "epoch" and isinstance(v, int | float)}
        self._scalars(values, int(record["epoch"]))

    def figure(self, tag: str, fig: Any, step: int = 0) -> None:
        """A matplotlib figure (e.g. accuracy against trainable parameters)."""
        if self.tb is not None:
            self.tb.add_figure(tag, fig, step, close=False)
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(fig)})

    def close(self) -> None:
        """Flushes and closes the backends."""
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(values)


def _tensorboard_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise DeltaTuneError(
            f"--tensorboard needs the tensorboard package ({e}): pip install tensorboard (or deltatune[tracking])"
        ) from None
    return SummaryWriter(log_dir=str(folder))


def _wandb_run(out: Path, config: dict) -> Any:
    try:
        import wandb
    except ImportError:
        raise DeltaTuneError(
            "--wandb needs the wandb package, which is not installed: pip install wandb (then wandb login, or set"
            " WANDB_MODE=offline), or drop --wandb (log.jsonl is always written; --tensorboard needs no account)"
        ) from None
    return wandb.init(project=WANDB_PROJECT, name=out.name, dir=str(out), config=config)


def log_figure(folder: str | Path, tag: str, fig: Any) -> None:
    """Writes one figure to a TensorBoard log in ``folder`` (the demo's accuracy-vs-parameters plot)."""
    tracker = Tracker(folder, tensorboard=True)
    tracker.figure(tag, fig)
    tracker.close()
