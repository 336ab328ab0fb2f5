"""The lean route GET /api/search takes (retrieval/server/query_route.py): FastAPI's spec and FastAPI's answers to bad
parameters, from the one query model, without FastAPI's dependency solving."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from retrieval.server.http_errors import add_error_handlers
from retrieval.server.query_route import QueryRoute, query_model


class Params(BaseModel):
    n: int = Field(3, ge=1, le=10, description="How many.")
    word: str | None = Field(None, max_length=5)


async def endpoint(request: Request, params: Annotated[Params, Query()]) -> Response:
    return JSONResponse({"path": request.url.path, **params.model_dump()})


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    add_error_handlers(app)
    app.router.add_api_route("/p", endpoint, route_class_override=QueryRoute)
    return TestClient(app)


def test_the_endpoint_gets_the_request_and_its_checked_parameters(client: TestClient) -> None:
    got = client.get("/p", params={"n": "7", "word": "hi", "other": "x"}).json()
    assert got == {"path": "/p", "n": 7, "word": "hi"}  # an unknown parameter is ignored, as FastAPI ignores it
    assert client.get("/p").json() == {"path": "/p", "n": 3, "word": None}  # the model's defaults


@pytest.mark.parametrize(
    "params, error",
    [
        ({"n": 0}, "n: Input should be greater than or equal to 1"),
        ({"n": "ten"}, "n: Input should be a valid integer"),
        ({"n": 11, "word": "toolong"}, "n: Input should be less than or equal to 10; word: String should have at"),
    ],
)
def test_bad_parameters_are_422_as_fastapi_words_them(client: TestClient, params: dict, error: str) -> None:
    r = client.get("/p", params=params)
    assert r.status_code == 422 and r.json()["error"].startswith(error)


def test_the_spec_lists_the_models_fields_as_query_parameters(client: TestClient) -> None:
    parameters = {p["name"]: p for p in client.get("/openapi.json").json()["paths"]["/p"]["get"]["parameters"]}
    assert set(parameters) == {"n", "word"} and all(p["in"] == "query" for p in parameters.values())
    assert parameters["n"]["schema"]["minimum"] == 1 and parameters["n"]["schema"]["maximum"] == 10
    assert parameters["n"]["description"] == "How many."


def test_an_endpoint_of_another_shape_is_refused() -> None:
    async def no_request(params: Annotated[Params, Query()]) -> Any: ...

    async def no_model(request: Request, n: int) -> Any: ...

    assert query_model(endpoint) is Params
    for wrong in (no_request, no_model):
        with pytest.raises(TypeError, match="must"):
            query_model(wrong)


def test_a_route_with_dependencies_is_refused_not_left_unsolved() -> None:
    from fastapi import Depends

    async def check() -> None: ...

    app = FastAPI(dependencies=[Depends(check)])  # e.g. an auth check every route should run
    with pytest.raises(TypeError, match="solves no dependencies"):
        app.router.add_api_route("/p", endpoint, route_class_override=QueryRoute)


def test_the_servers_spec_documents_both_searches_parameters(served_index: Path, torch_single_thread) -> None:
    from retrieval.server.app import create_app
    from retrieval.server.schemas import MAX_K

    paths = TestClient(create_app(served_index)).get("/openapi.json").json()["paths"]
    text = {p["name"]: p["schema"] for p in paths["/api/search"]["get"]["parameters"]}
    image = {p["name"] for p in paths["/api/search/image"]["post"]["parameters"]}
    assert set(text) == {"q", "like", "k", "theta", "weight", "target", "fusion"}
    assert image == {"k", "theta", "weight", "target", "fusion"}
    assert text["k"]["maximum"] == MAX_K and text["k"]["default"] == 10
