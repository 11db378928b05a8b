"""export: a checkpoint to a plain timm model folder (model.safetensors + config.json)."""
from __future__ import annotations

from collections.abc import Sequence

from .train_args import _Parser


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="vanillakd export", description="Write a student as model.safetensors + config.json, "
                "loadable by plain timm: timm.create_model('local-dir:DIR', pretrained=True).")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--model", default=None, help="architecture, when the checkpoint does not name it")
    p.add_argument("--use-ema", action="store_true", help="export the EMA weights")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled-code checkpoints you trust")
    args = p.parse_args(argv)
    from ..export import export_checkpoint
    out = export_checkpoint(args.checkpoint, args.out, args.model, args.use_ema, args.trust_checkpoint)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}\n"
          f"load with: timm.create_model('local-dir:{out}', pretrained=True)")
    return 0
