"""The `retrieval` command: the click group, its one error boundary, and the commands it holds.

Each command lives in the module of its family (train, evaluate, demo, index, serve); this module only gathers
them. The CLI is the only part of the package that prints or exits.
"""

from __future__ import annotations

import errno
import sqlite3
from typing import Any

import click

from retrieval.cli.demo import demo
from retrieval.cli.evaluate import calibrate, classify, eval_
from retrieval.cli.index import index, info, remove, search
from retrieval.cli.serve import serve
from retrieval.cli.train import synth, train, zeroshot
from retrieval.errors import RetrievalError, shown, user_error
from retrieval.threads import prepare_openmp


class Group(click.Group):
    """The CLI's error boundary: whatever a user, a file or the disk can cause (our RetrievalError; an OSError such
    as an unwritable --out or a full disk; a SQLite or FAISS error) becomes one line `Error: ...` and exit code 1;
    click's own usage errors exit 2. Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):  # Exit and Abort are RuntimeErrors
            raise
        except RetrievalError as e:
            raise click.ClickException(shown(str(e))) from e  # one line, whatever a path or id in it holds
        except (OSError, sqlite3.Error, RuntimeError) as e:
            if isinstance(e, OSError) and e.errno == errno.EPIPE:
                raise  # a closed pipe (| head): click's main ends quietly
            error = user_error(e)
            if error is None:
                raise  # a RuntimeError that is not FAISS's: a bug
            raise click.ClickException(shown(str(error))) from e


@click.group(cls=Group)
def main() -> None:
    """Cross-modal retrieval: train a text-image dual encoder, evaluate it, search with it.

    Start with `retrieval demo`, which makes sample data, trains a model and queries it.
    """
    prepare_openmp()  # before any command loads torch or FAISS: their OpenMP reads it once, as it loads


for command in (synth, train, zeroshot, eval_, calibrate, classify, demo, index, search, info, remove, serve):
    main.add_command(command)
