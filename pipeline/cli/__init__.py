"""The `resnet-pipe` command line (click): each command parses its arguments, calls the library
and prints; no logic lives here. `main` (in `main.py`) is the entry point; `data`, `submit`, `runs`
and the cluster commands are there, `promote`, `ui`, `deploy` and `predict` in `serving.py`, the
benchmarks in `bench.py`, the paper's studies in `study.py`, and what they share (one-line
errors, exit code 2, tables) in `common.py`.
"""

from pipeline.cli.main import main

__all__ = ["main"]
