"""The `demo` command: the whole tour (data, model, evaluation, searches) in one run."""

from __future__ import annotations

import click

from retrieval.cli.params import check_writable
from retrieval.cli.report import format_report
from retrieval.errors import shown


@click.command()
@click.option(
    "--root",
    default="index_data/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo keeps its data and model.",
)
@click.option(
    "--minutes", default=2.5, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Training budget."
)
def demo(root: str, minutes: float) -> None:
    """The main job on the embedded default: sample data, train (or reuse) a model, evaluate, query."""
    from retrieval.jobs.demo import run_demo

    check_writable(root, "--root", folder=True)
    result = run_demo(root, minutes=minutes)
    how = f"trained in {result.train_minutes:.1f} min" if result.trained else "reused; delete it to retrain"
    click.echo(f"data:  {result.data}\nmodel: {result.model} ({how})\nindex: {result.index}\n")
    click.echo("held-out recall:\n" + format_report(result.report) + "\n")
    click.echo("example text->image searches through the index (* = the image the caption was written for):")
    for query, own_id, hits in result.examples:
        click.echo(f'  "{shown(query)}"')
        for hit in hits:
            click.echo(f"    {'*' if hit.id == own_id else ' '} {hit.score:.3f}  {shown(hit.id)}")
    click.echo(f'\nsearch it yourself: retrieval search --index {result.index} --text "a small red circle"')
