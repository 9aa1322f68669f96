"""`python -m pipeline.cli`: the entry point of cluster jobs (`pipeline.cluster.jobs`)."""

from pipeline.cli.main import main

main()
