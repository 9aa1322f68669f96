"""The paper's experiments as studies (`resnet-pipe study NAME`): a set of runs grouped under one
MLflow parent run, and the paper's figure or table drawn from their metrics.

- `plans.py`: which runs each study makes, at `--scale quick` (this machine) or `paper`;
- `run.py`: submits them, groups them, and writes the figure and the table;
- `figures.py`: the figures and tables, from the runs' MLflow metrics.
"""
