#!/usr/bin/env python
"""The original entry point: `python esa_runner.py <flags>` is `esa run <flags>`."""

import sys

from esa_core.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]])
