#!/usr/bin/env python3
"""Runs the tfl command line from a checkout (`python cli.py ...`); installed, it is the `tfl` command."""

from tfl.cli import main

if __name__ == "__main__":
    main()
