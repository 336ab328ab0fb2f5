"""Issue 15's error boundary: whatever a user, a file or the disk can cause ends as one line `Error: ...` with exit
code 1 (click's usage errors: 2), on every command; the server answers such things with 422 or 503, never 500; and
the CLI loads neither torch nor FAISS for `--help`, nor torch for a text search with our own model."""

from __future__ import annotations

import errno
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from retrieval.cli.main import main
from retrieval.errors import ImageError, IndexChanged, NoSpaceError, ReadOnlyError, RetrievalError, user_error

HEAVY = ("torch", "faiss", "transformers", "ray", "matplotlib")
FAISS_ERROR = (
    "Error in faiss::FileIOReader::FileIOReader(const char*) at /project/faiss/impl/io.cpp:69: "
    "Error: 'f' failed: could not open /gone/vectors.faiss for reading: No such file or directory"
)


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result: Result, codes: tuple[int, ...] = (1,)) -> str:
    """The one `Error: ...` line of a failed command, checked to be the only one, with no traceback."""
    assert result.exit_code in codes and isinstance(result.exception, SystemExit), (
        result.output,
        repr(result.exception),
    )
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    if result.exit_code == 1:  # ours: the error line ends the output (a usage error prints the usage before it)
        assert result.output.strip().splitlines()[-1] == errors[0], result.output
    return errors[0]


# --- every command, given a bad argument -----------------------------------------------------------------------
@pytest.fixture
def place(tmp_path: Path) -> dict[str, Path]:
    """Things to point a command at: a missing path, an empty folder (no model, no index), a plain file (a path
    under it cannot be made), a manifest of one pair and a manifest that is not one."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a folder\n")
    pair = {"id": "a", "image": "a.png", "captions": ["a red circle"]}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    (tmp_path / "junk.jsonl").write_text("{this is not json\n")
    return {
        "missing": tmp_path / "missing",
        "empty": tmp_path / "empty",
        "file": tmp_path / "file",
        "under_file": tmp_path / "file" / "out",
        "pairs": tmp_path / "pairs.jsonl",
        "junk": tmp_path / "junk.jsonl",
    }


# command -> [(arguments with {placeholders} from `place`, exit code, a piece of the message)]
BAD_ARGUMENTS: dict[str, list[tuple[list[str], int, str]]] = {
    "synth": [
        (["--out", "{under_file}", "--n", "2"], 1, "is a file, not a folder"),
        (["--out", "{empty}", "--n", "0"], 2, "--n"),
    ],
    "train": [
        (["--data", "{missing}", "--out", "{empty}"], 2, "does not exist"),
        (["--data", "{pairs}", "--out", "{under_file}"], 1, "is a file, not a folder"),
        (["--data", "{junk}", "--out", "{empty}/model"], 1, "junk.jsonl"),
    ],
    "zeroshot": [
        (["--out", "{under_file}"], 1, "is a file, not a folder"),
        (["--out", "{empty}", "--top", "0"], 2, "--top"),
    ],
    "eval": [
        (["--model", "{empty}", "--data", "{pairs}"], 1, "not a model directory"),
        (["--index", "{empty}", "--data", "{pairs}"], 1, "not an index"),
        (
            ["--model", "{empty}", "--data", "{pairs}", "--out", "{under_file}/report.json"],
            1,
            "is a file, not a folder",
        ),
        (["--model", "{empty}", "--data", "{pairs}", "--out", "{empty}"], 2, "is a directory"),
        (["--data", "{missing}"], 2, "does not exist"),
    ],
    "calibrate": [
        (["--index", "{empty}", "--data", "{pairs}"], 1, "not an index"),
        (["--index", "{empty}", "--data", "{pairs}", "--weight", "2"], 2, "--weight"),
    ],
    "classify": [
        (["{pairs}", "--model", "{empty}", "--labels", "a,b"], 1, "not a model directory"),
        (["--model", "{empty}"], 1, "give image FILES or --data"),
        (["{missing}", "--model", "{empty}"], 2, "does not exist"),
    ],
    "demo": [(["--root", "{under_file}"], 1, "is a file, not a folder"), (["--minutes", "-1"], 2, "--minutes")],
    "index": [
        (["{pairs}", "--model", "{empty}", "--index", "{empty}/index"], 1, "not a model directory"),
        (["{pairs}", "--model", "{empty}", "--index", "{empty}/index", "--index-type", "nope"], 2, "--index-type"),
        (["{missing}", "--model", "{empty}", "--index", "{empty}/index"], 2, "does not exist"),
    ],
    "search": [
        (["--index", "{empty}", "--text", "a red circle"], 1, "not an index"),
        (["--index", "{missing}", "--text", "a red circle"], 2, "does not exist"),
    ],
    "info": [(["--index", "{empty}"], 1, "not an index"), (["--index", "{file}"], 2, "is a file")],
    "remove": [(["--index", "{empty}", "a"], 1, "not an index"), (["--index", "{empty}"], 2, "Missing argument")],
    "serve": [(["--index", "{empty}"], 1, "not an index"), (["--index", "{empty}", "--port", "70000"], 2, "--port")],
}


def test_every_command_has_bad_arguments_here() -> None:
    """A new command must say here how it fails, so the walk below covers it."""
    assert set(BAD_ARGUMENTS) == set(main.commands)


@pytest.mark.parametrize(
    "command, args, code, message",
    [
        pytest.param(command, args, code, message, id=f"{command}-{i}")
        for command, cases in BAD_ARGUMENTS.items()
        for i, (args, code, message) in enumerate(cases)
    ],
)
def test_a_bad_argument_is_one_error_line(
    command: str, args: list[str], code: int, message: str, place: dict[str, Path]
) -> None:
    line = error_line(run(command, *(a.format(**place) for a in args)), (code,))
    assert message in line, line


# --- the boundary itself: OS, SQLite and FAISS errors are one line; a bug keeps its traceback ----------------------
@pytest.mark.parametrize(
    "raised, message",
    [
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/gone/items.sqlite"),
            "Error: /gone/items.sqlite: No such file or directory; check the path",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/locked/manifest.json"),
            "Error: /locked/manifest.json: Permission denied; check its permissions or choose another path",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device"),
            "Error: No space left on device; the disk is full: free space",
        ),
        (
            sqlite3.DatabaseError("database disk image is malformed\nmore"),
            "Error: the index database (SQLite) failed: database disk image is malformed; check",
        ),
        (
            sqlite3.OperationalError("database is locked"),
            "Error: the index database (SQLite) failed: database is locked;",
        ),
        (
            RuntimeError(FAISS_ERROR),
            "Error: FAISS failed: could not open /gone/vectors.faiss for reading: No such file or directory; "
            "if an index's",
        ),
    ],
)
def test_os_sqlite_and_faiss_errors_are_one_line(
    raised: Exception, message: str, place: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from retrieval.index import store as index

    def fail(*_: object, **__: object) -> None:
        raise raised

    monkeypatch.setattr(index.IndexStore, "open", fail)
    assert error_line(run("info", "--index", place["empty"])).startswith(message)


@pytest.mark.parametrize("bug", [RuntimeError("an invariant broke"), KeyError("k"), TypeError("bad call")])
def test_a_programming_error_keeps_its_traceback(
    bug: Exception, place: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The boundary must not hide a bug as a user error: the exception escapes click (CliRunner keeps it)."""
    from retrieval.index import store as index

    def fail(*_: object, **__: object) -> None:
        raise bug

    monkeypatch.setattr(index.IndexStore, "open", fail)
    result = run("info", "--index", place["empty"])
    assert result.exception is bug and "Error:" not in result.output


def test_a_real_faiss_error_is_recognised() -> None:
    """The pattern matches what this FAISS raises, not only the text written above."""
    import faiss

    with pytest.raises(RuntimeError) as caught:
        faiss.read_index("/nonexistent/vectors.faiss")
    error = user_error(caught.value)
    assert error is not None and str(error).startswith("FAISS failed: could not open /nonexistent/vectors.faiss")
    assert user_error(RuntimeError("not faiss")) is None and user_error(ValueError("x")) is None


def test_thresholds_and_classify_raise_our_error_for_bad_input() -> None:
    """Bad input raises RetrievalError (also a ValueError, for callers that catch that)."""
    import numpy as np

    from retrieval.evaluation.thresholds import normalise
    from retrieval.prompts import check_template

    with pytest.raises(RetrievalError, match="unknown rule 'nope'") as caught:
        normalise(np.zeros((1, 2)), "nope")
    assert isinstance(caught.value, ValueError)
    with pytest.raises(RetrievalError, match="must contain"):
        check_template("{nope}")


# --- an unwritable --out -----------------------------------------------------------------------------------------
@pytest.fixture
def evaluated(monkeypatch: pytest.MonkeyPatch, place: dict[str, Path]) -> list[str]:
    """`eval` with the evaluation replaced by a fixed report, so only writing --out is left to fail."""
    from retrieval.jobs import evaluate

    figures = {"R@1": 0.5, "median_rank": 1.0, "mean_rank": 1.5, "mAP": 0.5, "n_queries": 2}
    report = {"text_to_image": figures, "image_to_text": figures, "n_images": 2, "n_texts": 2}
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *_, **__: report)
    return ["eval", "--model", str(place["empty"]), "--data", str(place["pairs"]), "--no-thresholds"]


def test_eval_writes_its_report(evaluated: list[str], tmp_path: Path) -> None:
    """The cases below with a path that works: the fixture's report reaches --out (what fails below is the write)."""
    result = run(*evaluated, "--out", tmp_path / "new" / "report.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "new" / "report.json").read_text())["n_images"] == 2


@pytest.mark.parametrize(
    "out, message",
    [
        # a folder that cannot be made: found by the check up front where /proc is not writable (not root),
        # else by mkdir
        (
            "/proc/nonexistent/report.json",
            r"Error: (/proc/nonexistent: No such file or directory; check the path|"
            r"--out /proc/nonexistent/report.json: /proc cannot be written \(no permission\))",
        ),
        ("/dev/full", r"Error: /dev/full: No space left on device; the disk is full"),  # a full disk: the write fails
    ],
)
def test_an_unwritable_out_is_one_line_naming_the_file(evaluated: list[str], out: str, message: str) -> None:
    top = Path(out).parents[-2]  # /proc, /dev
    if not top.is_dir() or (out == "/dev/full" and not Path(out).exists()):
        pytest.skip(f"{out} cannot be tried on this machine")
    assert re.match(message, error_line(run(*evaluated, "--out", out)))


def test_an_out_under_a_file_fails_before_the_work(place: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked first: an hour of evaluation is not lost to a typo in --out."""
    from retrieval.jobs import evaluate

    def never(*_: object, **__: object) -> None:
        raise AssertionError("evaluated although --out cannot be written")

    monkeypatch.setattr(evaluate, "evaluate_model", never)
    out = place["under_file"] / "r.json"
    line = error_line(run("eval", "--model", place["empty"], "--data", place["pairs"], "--out", out))
    assert line == f"Error: --out {out}: {place['file']} is a file, not a folder; choose another path"


# --- imports: --help loads neither torch nor FAISS -------------------------------------------------------------------
def loaded_after(*argvs: list[str]) -> list[list[str]]:
    """The heavy modules in sys.modules after each `retrieval ARGV` in turn, run in one fresh interpreter."""
    code = (
        "import sys\nfrom retrieval.cli.main import main\n"
        f"for argv in {list(argvs)!r}:\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert not e.code, e.code\n"
        f"    print('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("loaded:")]


def test_help_imports_neither_torch_nor_faiss() -> None:
    """Modules accumulate over the runs, so each must load none (one interpreter: this stays in the fast tier)."""
    argvs = [["--help"], ["synth", "--help"], ["search", "--help"], ["index", "--help"], ["eval", "--help"]]
    assert loaded_after(*argvs) == [[]] * len(argvs)


@pytest.mark.slow
def test_a_text_search_on_our_own_model_imports_no_torch(synth_data: Path, tiny_model: Path, tmp_path: Path) -> None:
    from retrieval.index.build import BuildOptions, build_index

    rows = [json.loads(line) for line in synth_data.read_text().splitlines()[:20]]
    for row in rows:
        row["image"] = str(synth_data.parent / row["image"])
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_index(tmp_path / "pairs.jsonl", tiny_model, tmp_path / "index", BuildOptions(progress=False))
    [loaded] = loaded_after(["search", "--index", str(tmp_path / "index"), "--text", "a small red circle", "--k", "3"])
    assert "torch" not in loaded and "transformers" not in loaded and "faiss" in loaded  # faiss: the search ran


# --- the server: 422 for the request's fault, 503 for the index's state, never 500 ---------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "raised, status, message",
    [
        (IndexChanged("published"), 503, "the index is being updated; retry in a moment"),
        (NoSpaceError("the disk of /x is full; free space"), 503, "the disk of /x is full; free space"),
        (ReadOnlyError("/x is read-only"), 503, "/x is read-only"),
        (ImageError("not an image"), 422, "not an image"),
        (RetrievalError("k must be at least 1"), 422, "k must be at least 1"),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/srv/index/records.jsonl"),
            503,
            "the index could not be read: No such file or directory",
        ),
        (
            sqlite3.DatabaseError("database disk image is malformed"),
            503,
            "the index could not be read: database disk image is malformed",
        ),
        (
            RuntimeError(FAISS_ERROR),
            503,
            "the index could not be read: could not open /gone/vectors.faiss for reading: No such file or directory",
        ),
    ],
)
def test_the_server_maps_each_error_to_its_status(
    raised: Exception, status: int, message: str, served_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from retrieval.server import app as server

    def fail(*_: object, **__: object) -> None:
        raise raised

    monkeypatch.setattr(server, "run_search", fail)
    response = TestClient(server.create_app(served_index)).get("/api/search", params={"q": "a red circle"})
    assert (response.status_code, response.json()) == (status, {"error": message})
    assert "/srv/index" not in response.text  # file paths are for the server's log, not its clients


@pytest.mark.slow
def test_a_bug_in_the_server_is_still_a_500(served_index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from retrieval.server import app as server

    def fail(*_: object, **__: object) -> None:
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(server, "run_search", fail)
    client = TestClient(server.create_app(served_index), raise_server_exceptions=False)
    assert client.get("/api/search", params={"q": "a red circle"}).status_code == 500
