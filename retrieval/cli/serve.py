"""The `serve` command: the search API and web page over one index (fastapi and uvicorn load only here)."""

from __future__ import annotations

import click

from retrieval.cli.params import MODEL


@click.command()
@click.option(
    "--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder."
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 opens the server to your network."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Let pages from this origin (e.g. http://localhost:3000) call the API; repeatable. Off by default.",
)
@click.option(
    "--model", "model_dir", type=MODEL, help="Model directory (or hf:<checkpoint>), if it moved since indexing."
)
@click.option(
    "--max-upload-mb",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest image upload accepted.",
)
@click.option(
    "--max-image-megapixels",
    default=40.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest uploaded image accepted for decoding (its size is read from the header first).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Requests worked on at once; the rest queue (default: one per CPU core).",
)
@click.option(
    "--max-batch",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Concurrent searches answered by one FAISS call at most (1: each alone).",
)
def serve(
    index_path: str,
    host: str,
    port: int,
    cors_origins: tuple[str, ...],
    model_dir: str | None,
    max_upload_mb: float,
    max_image_megapixels: float,
    threads: int | None,
    max_batch: int,
) -> None:
    """Serve the search API and the web page: open http://HOST:PORT/ in a browser.

    The model and index load once, before the first request. Endpoints: /api/search, /api/search/image,
    /api/items/ID, /api/thumb/ID, /api/health, /api/info; the OpenAPI spec is at /openapi.json.
    """
    from retrieval.server.process import serve as run_server  # fastapi and uvicorn only for this command

    click.echo(f"loading {index_path} ...", err=True)
    run_server(
        index_path,
        host,
        port,
        list(cors_origins),
        model=model_dir,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_upload_pixels=int(max_image_megapixels * 1e6),
        threads=threads,
        max_batch=max_batch,
    )
