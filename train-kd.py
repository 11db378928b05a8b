#!/usr/bin/env python3
"""Seed-compatible entry point: ``python train-kd.py /path/to/imagenet --model resnet50 --teacher ... --kd-loss kd``."""
import sys

from vanillakd.cli.train_kd import cli

if __name__ == "__main__":
    sys.exit(cli())
