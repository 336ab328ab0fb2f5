"""What the HTTP API takes and answers: the search parameters, the response records and the error statuses.

Kept apart from the routes because they are the API's contract: FastAPI checks requests against them and
writes the OpenAPI spec from them, so a change here is a change to what every client sees.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import File, Query, UploadFile
from pydantic import BaseModel, Field

from retrieval.index.search import MAX_QUERY_CHARS

MAX_K = 1000  # a page of results a person can look at; range queries past this want the Python API
Target = Literal["item", "image", "text"]
Fusion = Literal["mean", "weighted", "max", "min"]  # choices.FUSIONS, as a type the spec shows
UploadQ = Annotated[UploadFile, File(description="The query image (JPEG, PNG, WebP, ...).")]


# --- search parameters, read from the query string (their ranges are check_search_args', here for the spec) ---
class SearchOptions(BaseModel):
    """What both search endpoints take beside the query itself."""

    k: int = Field(default=10, ge=1, le=MAX_K, description="At most this many results.")
    theta: float | None = Field(
        default=None, ge=-1, le=1, description="Only results with similarity above this (none: top k)."
    )
    weight: float = Field(default=0.5, ge=0, le=1, description="w in sim = w cos(q, image) + (1-w) cos(q, caption).")
    target: Target = Field(default="item", description="Match whole items (fused), images only, or captions only.")
    fusion: Fusion = Field(
        default="weighted",
        description="Whole items: weighted by w, mean, max (image or caption) or min (image and caption).",
    )


class TextSearch(SearchOptions):
    """GET /api/search: a text, or an indexed item to find more like."""

    q: str | None = Field(default=None, max_length=MAX_QUERY_CHARS, description="Text query.")
    like: str | None = Field(default=None, description="An indexed item's id: more like this.")


SearchOptionsQ = Annotated[SearchOptions, Query()]
TextSearchQ = Annotated[TextSearch, Query()]


# --- response records (they also document the OpenAPI spec) ------------------------------------------
class Error(BaseModel):
    error: str


class HitOut(BaseModel):
    rank: int
    id: str
    path: str | None
    caption: str | None
    score: float
    image_score: float | None
    text_score: float | None
    thumb: str | None  # URL of the thumbnail, None for a text-only item


class SearchOut(BaseModel):
    query: dict[str, Any]
    count: int
    took_ms: float  # from the request's start to its answer, waiting for its turn included
    batch: int  # the requests answered by the FAISS call that answered this one
    results: list[HitOut]


class ItemOut(BaseModel):
    id: str
    path: str | None
    captions: list[str]
    extra: dict[str, Any]
    has_image: bool
    has_text: bool
    thumb: str | None


class Health(BaseModel):
    status: str
    items: int


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": what}
    for code, what in (
        (400, "Malformed request"),
        (404, "Unknown item, or no image"),
        (413, "Upload too large"),
        (422, "Invalid parameter or unreadable image"),
        (
            503,
            "The index is being updated or cannot be read, or too many uploads are waiting: retry (after Retry-After)",
        ),
    )
}
