"""Optional logging backends: TensorBoard (``--log-tensorboard``) and Weights & Biases (``--log-wandb``),
used when installed and never required."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import plain
from .config import RunConfig
from .errors import UserError


class ExternalLoggers:
    def __init__(self, cfg: RunConfig, run_dir: Path, enabled: bool = True):
        self.tb = self.wandb = None
        if not enabled:
            return
        if cfg.loop.log_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--log-tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.loop.log_wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("--log-wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb
            wandb.init(project="vanillakd", name=run_dir.name, dir=str(run_dir), config=plain(dict(cfg.flags)))

    def log(self, prefix: str, row: Mapping[str, Any], step: int) -> None:
        """Numeric fields of a summary row, as ``prefix/field`` at ``step`` (the epoch)."""
        values = {f"{prefix}/{k}" if prefix else k: float(v) for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
