#!/usr/bin/env python3
"""Seed-compatible entry point: ``python train-fd.py /path/to/imagenet --model resnet50 --teacher resnet152 ...``."""
import sys

from vanillakd.cli.train_fd import cli

if __name__ == "__main__":
    sys.exit(cli())
