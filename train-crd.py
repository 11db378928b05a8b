#!/usr/bin/env python3
"""Seed-compatible entry point: ``python train-crd.py /path/to/imagenet --model resnet50 --teacher resnet152 ...``."""
import sys

from vanillakd.cli.train_crd import cli

if __name__ == "__main__":
    sys.exit(cli())
