"""cache-teacher: the teacher's outputs over a training stream, for train-kd.py --teacher-cache."""
from __future__ import annotations

from collections.abc import Sequence

from .train_args import build_train_parser, count, parse_train_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_train_parser(
        "vanillakd cache-teacher",
        "Run the teacher once over the exact training stream train-kd.py will see with the same flags, and store "
        "its logits (top-k float16 or full). Pass the training command's flags plus --cache-dir; then train with "
        "--teacher-cache DIR. Logit methods only (feature methods need the teacher's features every step).")
    g = parser.add_argument_group("Cache")
    g.add_argument("--cache-dir", required=True, metavar="DIR", help="folder of the cache (created, or continued)")
    g.add_argument("--cache-topk", type=count, default=10,
                   help="classes kept per sample (log-probabilities in --cache-dtype); 0 = full logits")
    g.add_argument("--cache-dtype", default="auto", choices=["auto", "float16", "float32"],
                   help="auto: float16 for top-k, float32 for full logits")
    args = parse_train_args(parser, argv)
    from .run_config import check_run_config, run_config
    cfg = run_config(args)
    check_run_config(cfg)
    from ..teachers.cache_writer import write_cache
    manifest = write_cache(cfg)
    print(f"teacher cache {args.cache_dir}: {len(manifest['epochs_done'])} epoch(s) done")
    return 0
