"""Run under torchrun: build the real training loader over WebDataset shards on each rank, read two epochs and
write which samples (shard, position, read from the image's top-left pixel) each rank saw, in order."""
import json
import sys

import torch
import torch.distributed as dist

from vanillakd.cli.run_config import run_config
from vanillakd.cli.train_args import build_train_parser, parse_train_args
from vanillakd.data.loader import build_train_loader, set_epoch
from vanillakd.data.sources import build_train_val_any


def main(data_dir: str, out: str, workers: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = run_config(parse_train_args(build_train_parser("t", ""), [data_dir, "--dataset", "wds/tiny", "-b", "3",
                                                                    "--workers", workers, "--no-aug", "--seed", "1"]))
    train, _, n = build_train_val_any(data_dir, "wds/tiny")
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
              "crop_pct": 1.0}
    loader = build_train_loader(train.dataset, config, cfg, n, torch.device("cpu"), dist.get_world_size(), rank)
    seen = {}
    for epoch in (0, 1):
        set_epoch(loader, epoch)
        seen[epoch] = [[int(v) for v in x[:2, 0, 0]] for batch in loader.loader for x in batch[0]]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"seen": seen, "steps": len(loader)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
