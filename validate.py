#!/usr/bin/env python3
"""Seed-compatible entry point: ``python validate.py /path/to/imagenet --checkpoint <file>``; add
``--model <name>`` for a file that does not name its architecture (a plain state_dict)."""
import sys

from vanillakd.cli.validate import cli

if __name__ == "__main__":
    sys.exit(cli())
