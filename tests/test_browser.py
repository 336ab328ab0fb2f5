"""End to end: `retrieval serve` in a subprocess on a free loopback port, driven by Debian's chromium through
Playwright (never a downloaded browser). Types a query, checks the thumbnails and scores, moves the θ
slider, opens an item, asks for more like it, searches by an uploaded image, and saves a screenshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a server subprocess and a browser
pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[dev,serve]'")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_DIR = Path(os.environ.get("RETRIEVAL_SCREENSHOT_DIR", "/work/runs"))  # also kept here, if it exists
SCORE = re.compile(r"^-?\d\.\d{3}$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server(served_index: Path) -> Iterator[str]:
    """The real command, as a user starts it; its base URL once /api/health answers."""
    port = free_port()
    exe = Path(sys.executable).parent / "retrieval"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(exe), "serve", "--index", str(served_index), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`retrieval serve` exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if get(f"{base}/api/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("`retrieval serve` did not answer /api/health within 120 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"Debian chromium is not installed at {CHROMIUM} (apt-get install -y chromium; .ci/run does this)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield b
        b.close()


def test_the_command_answers_only_loopback_host_names(server: str) -> None:
    assert json.loads(get(f"{server}/api/health")[1]) == {"status": "ok", "items": 300}
    assert get(f"{server}/api/health", {"Host": "localhost"})[0] == 200
    assert get(f"{server}/api/health", {"Host": "evil.example"})[0] == 400  # a DNS-rebinding page


def test_a_1_mb_query_is_refused_by_the_http_server(server: str) -> None:
    """uvicorn refuses a request line this long before the app sees it; a 4xx, never a 5xx or a hang."""
    try:
        status, _ = get(f"{server}/api/search?q={'x' * 2**20}")
    except (ConnectionError, urllib.error.URLError):
        return  # the server may also close the connection on it
    assert 400 <= status < 500


def scores(page) -> list[float]:
    texts = page.locator(".result .score").all_inner_texts()
    assert texts and all(SCORE.match(t) for t in texts), texts
    return [float(t) for t in texts]


def answered(page, param: str) -> None:
    """Wait until the search a control change sent (debounced) is answered and shown: the page puts `param`
    in its URL as it sends the request, with aria-busy on the results, and takes aria-busy off once shown."""
    from playwright.sync_api import expect

    expect(page).to_have_url(re.compile(re.escape(param)))
    expect(page.locator("#results")).not_to_have_attribute("aria-busy", "true")


def test_search_in_the_browser(server: str, browser, tmp_path: Path, synth_data: Path) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)  # not the default 5 s: chromium, the server and pytest share 2 cores
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    expect(page.locator("#status")).to_contain_text("Search 300 items")

    # an empty query is answered on the page, without a request
    page.press("#q", "Enter")
    expect(page.locator("#error")).to_contain_text("Type some words")

    # a text query: ten thumbnails with scores, best first
    page.fill("#q", "a small red circle left of a large blue square")
    page.press("#q", "Enter")
    results = page.locator(".result")
    expect(results).to_have_count(10)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#status")).to_contain_text("10 results")
    top = scores(page)
    assert top == sorted(top, reverse=True)
    thumbs = page.locator(".result img")
    assert thumbs.count() >= 9  # at most one text-only scene among them
    for i in range(thumbs.count()):
        expect(thumbs.nth(i)).to_have_attribute("src", re.compile(r"^/api/thumb/"))
        assert thumbs.nth(i).evaluate("img => img.decode().then(() => img.naturalWidth)") > 0  # loaded, decodable
    shot = tmp_path / "server_screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    if SCREENSHOT_DIR.is_dir():
        shutil.copy(shot, SCREENSHOT_DIR / "server_screenshot.png")

    # θ between the 3rd and the 8th score keeps only the results above it. The page shows scores to three
    # decimals, so θ must not fall within that rounding of one: the count would then depend on unseen digits.
    candidates = [round(top[7] + (top[2] - top[7]) * f, 2) for f in (0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8)]
    theta = next(t for t in candidates if top[7] < t < top[2] and all(abs(v - t) > 0.0006 for v in top))
    page.locator("#theta").fill(str(theta))
    expect(page.locator("#theta-out")).to_have_text(f"{theta:.2f}")
    expect(page.locator("#status")).to_contain_text(f"above θ = {theta:.2f}")
    kept = sum(s > theta for s in top)
    expect(results).to_have_count(kept)
    assert 0 < kept < 10 and all(s > theta for s in scores(page))
    page.locator("#theta").fill("1")
    expect(page.locator("#status")).to_contain_text("No results above θ = 1.00")
    expect(results).to_have_count(0)
    page.locator("#theta").fill("-1")
    expect(page.locator("#theta-out")).to_have_text("off")
    expect(results).to_have_count(10)

    # fusion: under max an item scores its better part; the page asks for it and shows what the API answers
    page.select_option("#fusion", "max")
    expect(page.locator("#weight")).to_be_disabled()  # only the weighted rule takes w
    expect(page.locator("#weight-help")).to_contain_text("better of image and caption")
    answered(page, "fusion=max")
    text = urllib.parse.quote("a small red circle left of a large blue square")
    answer = json.loads(get(f"{server}/api/search?q={text}&k=10&fusion=max")[1])["results"]
    expect(results.first).to_contain_text(answer[0]["caption"])  # the page waited for the max answer
    assert scores(page) == pytest.approx([r["score"] for r in answer], abs=0.0006)  # shown to three decimals
    assert all(
        r["score"] == pytest.approx(max(s for s in (r["image_score"], r["text_score"]) if s is not None))
        for r in answer
    )
    page.select_option("#fusion", "weighted")
    expect(page.locator("#weight")).to_be_enabled()

    # keyboard: the first result opens with Enter, shows its captions, and Escape closes it
    results.first.locator(".open").focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#item-view")
    expect(dialog).to_be_visible()
    expect(page.locator("#item-captions li").first).not_to_be_empty()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    # more like this, by images only: the item comes back first, as the most similar to itself
    page.select_option("#target", "image")
    expect(page.locator("#weight")).to_be_disabled()  # w only weighs the parts of whole items
    answered(page, "target=image")  # else the caption below is read from the old list and the click lands on the new
    source = results.filter(has=page.locator("img")).first  # a text-only item has no image to match
    first_caption = source.locator(".caption").inner_text()
    source.locator(".like").click()
    expect(page.locator("#query-label")).to_contain_text("More like")
    expect(results.first.locator(".caption")).to_have_text(first_caption)
    expect(results.first.locator(".score")).to_have_text(re.compile(r"^(1\.000|0\.99\d)$"))

    # search by an image, in captions-only mode (image -> text)
    page.select_option("#target", "text")
    page.set_input_files("#image-input", str(synth_data.parent / "images" / "synth-000020.png"))
    expect(page.locator("#query-image")).to_be_visible()
    expect(page.locator("#query-label")).to_contain_text("synth-000020.png")
    expect(results).to_have_count(10)
    expect(page.locator("#status")).to_contain_text("10 results")
    assert not errors, errors


# Every search request from here on waits until it is aborted: a search the test can hold in flight.
HOLD_SEARCHES = """() => {
  const real = window.fetch;
  window.fetch = (url, options) => String(url).startsWith("/api/search")
    ? new Promise((_, reject) => options.signal.addEventListener(
        "abort", () => reject(new DOMException("aborted", "AbortError"))))
    : real(url, options);
}"""


def test_an_aborted_search_leaves_the_newer_one_busy(server: str, browser) -> None:
    """A control change aborts the search in flight. The aborted one must not mark the page answered (no
    aria-busy) while the newer one is still running: a reader, or a test, would take the old list for the new."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    page = browser.new_page()
    page.goto(server)
    page.fill("#q", "a small red circle")
    page.press("#q", "Enter")
    expect(page.locator(".result")).to_have_count(10)
    page.evaluate(HOLD_SEARCHES)
    busy = page.locator("#results")
    page.select_option("#target", "image")
    expect(page).to_have_url(re.compile(r"target=image"))
    expect(busy).to_have_attribute("aria-busy", "true")
    page.select_option("#target", "text")  # aborts the image search, and is held in turn
    expect(page).to_have_url(re.compile(r"target=text"))
    page.wait_for_timeout(300)  # the aborted fetch settles within a task or two
    expect(busy).to_have_attribute("aria-busy", "true")
    expect(page.locator(".result")).to_have_count(10)  # the old list stays until an answer replaces it
    page.close()
