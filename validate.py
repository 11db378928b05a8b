#!/usr/bin/env python3
"""Seed-compatible entry point: ``python validate.py /path/to/imagenet --model <name> --checkpoint <file>``."""
import sys

from vanillakd.cli.validate import cli

if __name__ == "__main__":
    sys.exit(cli())
