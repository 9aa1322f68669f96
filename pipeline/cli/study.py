"""`resnet-pipe study NAME`: the paper's experiments, each a set of runs under one MLflow parent
run, with the paper's figure or table drawn from them."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import check_prepared, fail
from pipeline.study.plans import STUDIES


@click.command("study")
@click.argument("name", type=click.Choice(sorted(STUDIES)))
@click.option("--scale", type=click.Choice(["quick", "paper"]), default="quick", show_default=True,
              help="quick: sized for a laptop's CPU (it says what it runs); paper: the jobs.")  # fmt: skip
@click.option("--dataset", type=click.Choice(["cifar10", "imagenet"]), default="cifar10", show_default=True)
@click.option("--root", default=None, help="The prepared dataset (default: the jobs' own data.root).")
@click.option("--address", default=None, help="A Ray cluster (ray://HEAD:10001 or an address to join).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="A setting for every run.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("studies"), show_default=True,
              help="Where the figure (PNG) and the table (Markdown) are written.")  # fmt: skip
@click.option("--runs-of", default=None, metavar="RUN_ID",
              help="Train nothing: take the finished runs of this earlier study's MLflow parent run "
                   "(responses: the degradation study's nets).")  # fmt: skip
def study(
    name: str,
    scale: str,
    dataset: str,
    root: str | None,
    address: str | None,
    overrides: tuple,
    out: Path,
    runs_of: str | None,
) -> None:
    """Run study NAME: degradation (Figure 6; Figure 4 with --dataset imagenet), depth (Table 6),
    shortcuts (Table 3) or responses (Figure 7, and the gradient at each block); the runs are
    children of one MLflow run, which holds the figure. As many runs train at once as the
    cluster has room for."""
    from pipeline.cluster.address import cluster_address, is_job_server
    from pipeline.config import JobError, load_job
    from pipeline.study.plans import plan

    try:
        chosen = plan(name, scale, dataset)
        root = root or load_job(chosen.members[0].job).data.root
        for member in chosen.members:  # every member's settings, before anything runs
            load_job(member.job, [f"data.root='{root}'", *chosen.settings, *overrides, *member.overrides])
    except (ValueError, JobError) as e:
        fail(str(e))
    if is_job_server(cluster_address(address)):
        fail(
            "a study runs its runs from this machine: give --address ray://HEAD:10001 (or a cluster address)"
        )
    check_prepared(root)
    from pipeline.cluster.address import ClusterError
    from pipeline.cluster.resources import NoRoom
    from pipeline.study.run import StudyError, run_study

    try:
        result = run_study(chosen, root, out, address, overrides, runs_of=runs_of)
    except (StudyError, NoRoom, ClusterError) as e:
        fail(str(e))  # --runs-of a study without these runs; a run no node holds; no cluster answers
    click.echo(result.table, nl=False)
    for line in result.findings:
        click.echo(f"- {line}")
    click.echo(f"figure: {result.figure}; MLflow parent run {result.parent_run_id}")
    if result.failed:
        fail("runs that failed: " + "; ".join(result.failed))
