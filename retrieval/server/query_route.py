"""A FastAPI route for the one request every client sends in bulk: its endpoint takes one query-string model.

FastAPI writes the route's spec as for any route (the model's fields are its query parameters), but each request
is checked against the model directly instead of through FastAPI's dependency solving, which took 0.11 of the
0.25 ms of event-loop time a search cost (100k flat, 32 clients). The event loop parses every request, and while
it does, searches wait for it, so the batches it feeds grow and the other core idles. A bad parameter is answered
as FastAPI answers one: a RequestValidationError, located in the query.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response


class QueryRoute(APIRoute):
    """An APIRoute whose endpoint is `async def endpoint(request: Request, params: Annotated[Model, Query()])`,
    returning a Response."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The handler Starlette calls per request. Dependencies would go unsolved here, so a route or app that
        declares any is refused when the route is made, not skipped at request time."""
        if self.dependencies or self.dependant.dependencies:
            raise TypeError(f"{self.path}: a QueryRoute solves no dependencies; declare none on it or on its app")
        model, endpoint = query_model(self.endpoint), self.endpoint

        async def handle(request: Request) -> Response:
            try:
                params = model.model_validate(dict(request.query_params))
            except ValidationError as e:
                raise RequestValidationError([{**err, "loc": ("query", *err["loc"])} for err in e.errors()]) from None
            response: Response = await endpoint(request, params)
            return response

        return handle


def query_model(endpoint: Callable[..., Any]) -> type[BaseModel]:
    """The model of an endpoint's (request, params) signature: params' type, Annotated[Model, Query()] or Model."""
    hints = get_type_hints(endpoint, include_extras=True)
    hints.pop("return", None)
    if len(hints) != 2 or next(iter(hints.values())) is not Request:
        raise TypeError(f"{endpoint.__name__} must take (request: Request, params: a query model), not {list(hints)}")
    _, hint = hints.values()
    model = get_args(hint)[0] if get_origin(hint) is Annotated else hint
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{endpoint.__name__}'s params must be a pydantic model, not {model!r}")
    return model
