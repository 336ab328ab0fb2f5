"""The HTTP API through FastAPI's test client: every endpoint answers what `Index` answers, and every bad
input gets a one-line JSON error with the right 4xx. Ends with schemathesis over the OpenAPI spec: no 5xx.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import same_ranking
from hypothesis import HealthCheck, given, settings

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[dev,serve]'")
import schemathesis
from fastapi.testclient import TestClient
from PIL import Image
from schemathesis import GenerationMode

from retrieval.cli.main import main
from retrieval.data.images import load_image
from retrieval.index.build import BuildOptions, build_index
from retrieval.index.handle import Index
from retrieval.index.search import MAX_QUERY_CHARS
from retrieval.server.app import create_app
from retrieval.server.media import THUMB_SIDE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_single_thread")]  # integration: a trained model, indexes
UPLOAD_LIMIT = 256 * 1024  # small, so the over-the-limit uploads are cheap to make


@pytest.fixture(scope="module")
def app(served_index: Path, torch_single_thread):
    return create_app(served_index, max_upload_bytes=UPLOAD_LIMIT)


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return TestClient(app)


@pytest.fixture(scope="module")
def index(served_index: Path) -> Index:
    return Index.open(served_index)


def png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def error_of(response, status: int) -> str:
    """The one-line message of a JSON error with the expected status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert message and "\n" not in message
    return message


def same_hits(results: list[dict], hits) -> None:
    assert [r["id"] for r in results] == [h.id for h in hits]
    assert [r["score"] for r in results] == pytest.approx([h.score for h in hits], abs=1e-6)
    assert [r["rank"] for r in results] == list(range(1, len(hits) + 1))


# --- searches answer what Index.search answers ----------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {"q": "a small red circle", "k": 5},
        {"q": "a large blue star", "k": 20, "target": "image"},
        {"q": "a large blue star", "k": 20, "target": "text"},
        {"q": "a green square on the left", "k": 300, "weight": 0.8, "theta": 0.3},
    ],
)
def test_text_search_is_index_search(client: TestClient, index: Index, params: dict) -> None:
    body = client.get("/api/search", params=params).json()
    expected = index.search(
        text=params["q"],
        k=params["k"],
        theta=params.get("theta"),
        weight=params.get("weight", 0.5),
        target=params.get("target", "item"),
    )
    same_hits(body["results"], expected)
    assert body["count"] == len(expected) and body["query"]["q"] == params["q"]
    if "theta" in params:
        assert 0 < len(expected) < 300 and all(r["score"] > params["theta"] for r in body["results"])


def test_hits_carry_scores_and_thumbnail_links(client: TestClient) -> None:
    results = client.get("/api/search", params={"q": "a small red circle", "k": 300}).json()["results"]
    by_id = {r["id"]: r for r in results}
    assert by_id["synth-000000"]["thumb"] == "/api/thumb/synth-000000"
    assert by_id["synth-000003"]["thumb"] is None and by_id["synth-000003"]["image_score"] is None  # text only
    assert by_id["synth-000005"]["text_score"] is None and by_id["synth-000005"]["caption"] is None  # image only
    assert by_id["sub dir/scene 7"]["thumb"] == "/api/thumb/sub%20dir%2Fscene%207"
    assert client.get(by_id["sub dir/scene 7"]["thumb"]).status_code == 200


def test_more_like_this_is_index_search(client: TestClient, index: Index) -> None:
    body = client.get("/api/search", params={"like": "synth-000010", "k": 8, "target": "image"}).json()
    same_hits(body["results"], index.search(like="synth-000010", k=8, target="image"))
    assert body["results"][0]["id"] == "synth-000010"  # an image is most like itself


def test_image_upload_search_is_index_search(client: TestClient, index: Index, synth_data: Path) -> None:
    path = synth_data.parent / "images" / "synth-000020.png"
    response = client.post(
        "/api/search/image",
        params={"k": 6, "target": "text"},
        files={"file": ("query.png", path.read_bytes(), "image/png")},
    )
    body = response.json()
    same_hits(body["results"], index.search(image=load_image(path), k=6, target="text"))
    assert body["query"]["image"] == "query.png" and body["query"]["target"] == "text"


# --- items and thumbnails -------------------------------------------------------------------------
def test_item_metadata(client: TestClient) -> None:
    item = client.get("/api/items/synth-000001").json()
    assert item["has_image"] and item["has_text"] and len(item["captions"]) >= 2
    assert item["extra"]["objects"] and item["thumb"] == "/api/thumb/synth-000001"
    text_only = client.get("/api/items/synth-000003").json()
    assert not text_only["has_image"] and text_only["path"] is None and text_only["thumb"] is None
    assert client.get("/api/items/sub%20dir%2Fscene%207").json()["id"] == "sub dir/scene 7"


def test_thumbnail_is_a_small_jpeg_cached_under_the_index(client: TestClient, served_index: Path) -> None:
    first = client.get("/api/thumb/synth-000002")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(first.content))
    assert img.format == "JPEG" and max(img.size) <= THUMB_SIDE
    cached = list((served_index / "thumbs").glob("*.jpg"))
    assert any(f.read_bytes() == first.content for f in cached)
    assert client.get("/api/thumb/synth-000002").content == first.content
    assert not list((served_index / "thumbs").glob("*.tmp"))


def test_thumbnail_of_a_text_only_item_or_a_vanished_file_is_404(
    tiny_model: Path, synth_data: Path, tmp_path: Path, client: TestClient
) -> None:
    assert "has no image" in error_of(client.get("/api/thumb/synth-000003"), 404)
    shutil.copy(synth_data.parent / "images" / "synth-000000.png", tmp_path / "gone.png")
    build_index(tmp_path, tiny_model, tmp_path / "idx", BuildOptions(progress=False))
    (tmp_path / "gone.png").unlink()
    gone = TestClient(create_app(tmp_path / "idx", thumb_cache=False))
    assert "re-run `retrieval index`" in error_of(gone.get("/api/thumb/gone.png"), 404)


# --- bad inputs: one-line JSON errors with the right status ---------------------------------------
@pytest.mark.parametrize(
    "params, words",
    [
        ({"q": ""}, "empty"),
        ({"q": "   "}, "empty"),
        ({"q": "x" * (MAX_QUERY_CHARS + 1)}, f"at most {MAX_QUERY_CHARS} characters"),
        ({"q": "a", "k": 0}, "k: Input should be greater than or equal to 1"),
        ({"q": "a", "k": -3}, "k:"),
        ({"q": "a", "k": 10**6}, "k: Input should be less than or equal to"),
        ({"q": "a", "k": "ten"}, "k: Input should be a valid integer"),
        ({"q": "a", "theta": 2}, "theta: Input should be less than or equal to 1"),
        ({"q": "a", "theta": -1.5}, "theta:"),
        ({"q": "a", "theta": "nan"}, "theta:"),
        ({"q": "a", "weight": 1.5}, "weight:"),
        ({"q": "a", "target": "video"}, "target: Input should be 'item', 'image' or 'text'"),
        ({}, "give exactly one query"),
        ({"q": "a", "like": "synth-000001"}, "give exactly one query"),
    ],
)
def test_bad_search_parameters_are_422(client: TestClient, params: dict, words: str) -> None:
    assert words in error_of(client.get("/api/search", params=params), 422)


def test_a_1_mb_query_is_422(app) -> None:
    """Sent straight into the ASGI app: httpx refuses URLs over 64 KB (and uvicorn request lines over 16 KB)."""
    status, body = raw_request(app, "GET", "/api/search", b"q=" + b"x" * 2**20)
    assert status == 422 and f"at most {MAX_QUERY_CHARS} characters" in body["error"]


def test_a_content_length_that_is_not_a_number_is_400(app) -> None:
    status, body = raw_request(app, "POST", "/api/search/image", b"", [(b"content-length", b"lots")])
    assert status == 400 and body["error"] == "Content-Length is not a number"


def raw_request(app, method: str, path: str, query: bytes, headers: list | None = None) -> tuple[int, dict]:
    messages = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    return messages[0]["status"], json.loads(b"".join(m.get("body", b"") for m in messages[1:]))


@pytest.mark.parametrize(
    "path",
    [
        "/api/items/no-such-item",
        "/api/thumb/no-such-item",
        "/api/search?like=no-such-item",
        "/api/items/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/thumb/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/thumb/%2Fetc%2Fpasswd",
        "/api/thumb/..%2Fpairs.jsonl",
        "/api/search?like=..%2F..%2Fetc%2Fpasswd",
        "/api/thumb/../../../etc/passwd",
        "/api/thumb/synth-000001%00.png",
        "/api/thumb/synth-000001%2F..%2Fsynth-000002",
    ],
)
def test_unknown_ids_and_path_tricks_are_404(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404 and "root:" not in response.text, response.text
    assert response.json()["error"]


def test_an_id_that_looks_like_a_path_is_only_a_key(client: TestClient, synth_data: Path) -> None:
    """ "../escape" is an item's id: it names that item's image, never a file relative to anything."""
    assert client.get("/api/items/..%2Fescape").json()["id"] == "../escape"
    thumb = Image.open(io.BytesIO(client.get("/api/thumb/..%2Fescape").content))
    assert thumb.size == load_image(synth_data.parent / "images" / "synth-000008.png").size


@pytest.mark.parametrize(
    "content, words",
    [
        (b"this is not an image", "not a recognised image format"),
        (b"", "not a recognised image format"),
        (png_bytes(Image.effect_noise((64, 64), 50))[:2000], "truncated"),
    ],
)
def test_an_upload_that_is_not_an_image_is_422(client: TestClient, content: bytes, words: str) -> None:
    message = error_of(client.post("/api/search/image", files={"file": ("x.png", content, "image/png")}), 422)
    assert message.startswith("cannot read the uploaded image: ") and words in message
    assert "/tmp" not in message  # the temporary file's name is the server's business


def test_a_50_megapixel_upload_is_refused_before_decoding(client: TestClient) -> None:
    huge = png_bytes(Image.new("L", (10_000, 5_000), 128))  # a flat colour compresses to ~50 KB
    assert len(huge) < UPLOAD_LIMIT
    message = error_of(client.post("/api/search/image", files={"file": ("huge.png", huge, "image/png")}), 422)
    assert "50 megapixels, over the limit of 40 megapixels" in message and "downscale it" in message


def test_an_upload_over_the_size_limit_is_413(client: TestClient) -> None:
    big = b"\xff" * (UPLOAD_LIMIT + 1)
    message = error_of(client.post("/api/search/image", files={"file": ("big.jpg", big, "image/jpeg")}), 413)
    assert "over the limit of 0.25 MB" in message and "--max-upload-mb" in message


def test_a_chunked_upload_is_cut_off_at_the_limit(client: TestClient) -> None:
    """No Content-Length: the body is counted as it arrives and refused once past the limit."""
    sent = []

    def body():
        for _ in range(64):  # 4 MB offered, 16 times the limit
            sent.append(1)
            yield b"x" * 65536

    headers = {"content-type": "multipart/form-data; boundary=b"}
    message = error_of(client.post("/api/search/image", content=body(), headers=headers), 413)
    assert "over the limit" in message


def test_an_upload_without_a_file_is_422(client: TestClient) -> None:
    assert "file: Field required" in error_of(client.post("/api/search/image", data={"x": "1"}), 422)


def test_unknown_routes_and_methods_are_json(client: TestClient) -> None:
    assert error_of(client.get("/api/nothing"), 404) == "Not Found"
    assert error_of(client.delete("/api/search"), 405) == "Method Not Allowed"
    assert client.get("/docs").status_code == 404  # its page loads scripts from a CDN


# --- health, info, the page -------------------------------------------------------------------------
def test_health_and_info(client: TestClient, served_index: Path) -> None:
    assert client.get("/api/health").json() == {"status": "ok", "items": 300}
    info = client.get("/api/info").json()
    assert info["counts"]["items"] == 300 and info["path"] == str(served_index)
    assert info["defaults"] == {"k": 10, "theta": None, "weight": 0.5, "target": "item"}
    assert info["max_upload_bytes"] == UPLOAD_LIMIT and info["max_upload_pixels"] == 40_000_000


def test_the_page_and_its_files_are_served_from_memory(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/app.js"' in page.text and "http" not in page.text.split("<body>")[0]  # no CDN
    for path in ("/app.js", "/style.css", "/favicon.svg"):
        assert client.get(path).status_code == 200
    assert client.get("/index.html").status_code == 404  # only the listed routes, no static folder


def test_cors_is_off_unless_asked_for(client: TestClient, served_index: Path) -> None:
    origin = {"Origin": "http://example.com"}
    assert "access-control-allow-origin" not in client.get("/api/health", headers=origin).headers
    allowed = TestClient(create_app(served_index, cors_origins=["http://example.com"]))
    assert allowed.get("/api/health", headers=origin).headers["access-control-allow-origin"] == "http://example.com"
    other = allowed.get("/api/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_only_allowed_host_names_are_answered(served_index: Path) -> None:
    """A DNS-rebinding page reaches a localhost server under its own host name; it is refused."""
    local = TestClient(create_app(served_index, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1")
    assert local.get("/api/health").status_code == 200
    assert local.get("/api/health", headers={"Host": "evil.example"}).status_code == 400


def test_concurrent_requests_get_the_sequential_answers(client: TestClient) -> None:
    """Requests share one index across threads with no lock (see retrieval/server/threads.py). The image and text
    targets filter items (the index has a text-only and an image-only item): FAISS swaps the filter inside
    the search parameters during a search, so sharing those between threads crashed the process. Concurrent
    requests share FAISS calls (tests/test_batching.py), whose scores may differ in their last bits."""
    queries = [
        {"q": f"a {size} {colour} circle", "k": 10, "target": target}
        for size in ("small", "large")
        for colour in ("red", "green", "blue", "yellow")
        for target in ("item", "image", "text")
    ]
    queries += [{"like": f"synth-0000{i:02d}", "k": 10, "target": "image"} for i in range(10, 18)]

    def answer(params: dict) -> list[tuple[str, float]]:
        return [(r["id"], r["score"]) for r in client.get("/api/search", params=params).json()["results"]]

    expected = [answer(p) for p in queries]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(answer, queries * 4))
    for hits, want in zip(got, expected * 4, strict=True):
        same_ranking(hits, want)


# --- the command ------------------------------------------------------------------------------------
def test_serve_refuses_a_folder_that_is_not_an_index(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--index", str(tmp_path)])
    assert result.exit_code == 1 and "is not an index" in result.output and "Traceback" not in result.output


def test_serve_help_lists_the_security_options() -> None:
    out = CliRunner().invoke(main, ["serve", "--help"]).output
    assert all(opt in out for opt in ("--host", "--port", "--cors-origin", "--max-upload-mb", "--max-image-megapixels"))
    assert "127.0.0.1" in out


# --- schemathesis over the OpenAPI spec: no request, valid or not, makes a 5xx -----------------------
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_from_the_spec_is_a_server_error(app, mode: GenerationMode) -> None:
    """Each operation in /openapi.json gets 20 generated requests (hypothesis, derandomized: same every run).

    Operations are looped here rather than through `@schema.parametrize()`, whose fixture-loading path
    breaks on pytest 9.2 (schemathesis 4.32 reads a `_nodeid` that pytest no longer has).
    """
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} == {
        "/api/search",
        "/api/search/image",
        "/api/items/{item_id}",
        "/api/thumb/{item_id}",
        "/api/health",
        "/api/info",
    }
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not (operation.query or operation.body):
            continue  # an id in the path may be any string, and health and info take nothing: none is invalid

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        def no_server_error(case) -> None:
            response = case.call()
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}"
            )
            if response.status_code >= 400:
                assert json.loads(response.text)["error"]

        no_server_error()
