"""Issue 14's small CLI cases: what a careless or hostile user types or stores gives one error line (never a
traceback) or is shown as data, a killed training run never logs an epoch twice, and progress in a log is a
readable line every few seconds."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from retrieval.cli.main import main
from retrieval.errors import shown
from retrieval.index.store import IndexStore
from retrieval.progress import PlainProgress, progress_bar

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result: Result, code: int = 1) -> str:
    """The one `Error: ...` line of a failed command, checked to be the only one and no traceback."""
    assert result.exit_code == code and isinstance(result.exception, SystemExit), (
        result.output,
        repr(result.exception),
    )
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture(scope="module")
def hostile_index(synth_data: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 scenes as an HNSW index; scene 0's id holds a newline and scene 1's caption an ANSI colour escape."""
    from retrieval.index.build import BuildOptions, build_index

    root = tmp_path_factory.mktemp("hostile")
    rows = []
    for i, line in enumerate(synth_data.read_text().splitlines()[:20]):
        row = json.loads(line)
        row["image"] = str(synth_data.parent / row["image"])
        if i == 0:
            row["id"] = "a\nb"
        if i == 1:
            row["captions"] = ["\x1b[31m a red circle \x1b[0m"]
        rows.append(json.dumps(row) + "\n")
    (root / "pairs.jsonl").write_text("".join(rows))
    build_index(root / "pairs.jsonl", tiny_model, root / "index", BuildOptions("hnsw", progress=False))
    return root / "index"


@pytest.mark.parametrize("command", ["search", "index"])
@pytest.mark.parametrize("size", ["nan", "inf", "1e300G", "-inf"])
def test_a_size_no_machine_has_is_one_error_line(
    command: str, size: str, hostile_index: Path, tiny_model: Path
) -> None:
    """Before: int(float('nan')) raised ValueError, inf and 1e300G OverflowError, as tracebacks. A bad value of an
    option is click's usage error (exit 2), as `--max-memory lots` already was."""
    args = (
        ["search", "--index", hostile_index, "--text", "x"]
        if command == "search"
        else [
            "index",
            hostile_index.parent / "pairs.jsonl",
            "--model",
            tiny_model,
            "--index",
            hostile_index,
            "--engine",
            "ray",
        ]
    )
    line = error_line(run(*args, "--max-memory", size), code=2)
    assert f"'{size}' is not a size a machine has; write it like 512M or 8G" in line


@pytest.mark.parametrize(
    "args",
    [
        ["search", "--text", "a red circle", "--ef-search", "2147483648"],
        ["search", "--text", "a red circle", "--nprobe", "2147483648"],
        ["search", "--text", "a red circle", "--ef-search", "-1"],
        ["index", "SOURCE", "--model", "MODEL", "--ef-search", "2147483648"],
        ["eval", "--data", "SOURCE", "--ef-search", "2147483648"],
    ],
)
def test_an_ann_knob_past_a_c_int_is_one_error_line(args: list[str], hostile_index: Path, tiny_model: Path) -> None:
    """Before: FAISS raised OverflowError ("argument 2 of type 'int'") as a traceback, and `index` stored the value
    in the manifest, so every later search failed. Now the value is refused and the index stays as it was."""
    args = [{"SOURCE": hostile_index.parent / "pairs.jsonl", "MODEL": tiny_model}.get(a, a) for a in args]
    before = (hostile_index / "manifest.json").read_text()
    line = error_line(run(args[0], "--index", hostile_index, *args[1:]))
    knob, value = args[-2].removeprefix("--").replace("-", "_"), args[-1]
    want = (
        f"Error: {knob} must be a whole number from 1 to 2147483647, got {value}; give {args[-2]} a value in that range"
    )
    assert line == want
    assert (hostile_index / "manifest.json").read_text() == before
    assert run("search", "--index", hostile_index, "--text", "a red circle", "--json").exit_code == 0


@pytest.mark.parametrize("template", ["{label}{0}", "{nope}", "{", "}", "{label} {}", "no label"])
def test_a_template_with_other_fields_is_one_error_line(template: str, synth_data: Path, tiny_model: Path) -> None:
    """Before: '{label}{0}' raised IndexError, '{nope}' KeyError, '{' ValueError, as tracebacks."""
    image = sorted((synth_data.parent / "images").iterdir())[0]
    line = error_line(run("classify", "--model", tiny_model, "--labels", "red,blue", "--template", template, image))
    assert "the template must contain {label} and nothing else in braces" in line and repr(template) in line


def test_stored_strings_are_shown_as_data(hostile_index: Path) -> None:
    """An id with a newline printed a second, fake result line; a caption with an ANSI escape coloured the
    terminal. Now each hit is one line and the control characters are shown escaped."""
    k = IndexStore.open(hostile_index).counts()["items"]
    result = run("search", "--index", hostile_index, "--text", "a red circle", "--k", k)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == k and all(line.split()[0] == str(rank) for rank, line in enumerate(lines, 1))
    assert "\x1b" not in result.output
    assert any("  a\\nb  " in line for line in lines) and any("\\x1b[31m a red circle" in line for line in lines)


def test_an_error_naming_a_stored_string_stays_one_line(hostile_index: Path) -> None:
    line = error_line(run("search", "--index", hostile_index, "--like", "x\n\x1b[2Jy"))
    assert "\x1b" not in line


def test_shown_escapes_only_what_a_terminal_would_act_on() -> None:
    assert shown("a\nb\r\t\x1b[31m\x7f\x85\u202e\udcff") == "a\\nb\\r\\t\\x1b[31m\\x7f\\x85\\u202e\\xff"
    assert shown("café 東京 - ok [1]") == "café 東京 - ok [1]"


@pytest.mark.slow
def test_a_kill_between_the_log_and_the_state_never_logs_an_epoch_twice(synth_data: Path, tmp_path: Path) -> None:
    """Each epoch appends its log line, then saves the state. A kill -9 between the two left a line for an epoch
    the state does not have; --resume ran that epoch again and logged it twice ([1, 2, 3, 3])."""
    out = tmp_path / "m"
    args = ["train", "--data", synth_data, "--out", out, "--preset", "tiny"]
    assert run(*args, "--epochs", "2").exit_code == 0
    log = out / "train_log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([*lines, json.dumps({**json.loads(lines[-1]), "epoch": 3}), '{"epoch": 4, "lo']) + "\n")
    result = run(*args, "--epochs", "3", "--resume")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert run(*args, "--epochs", "1").exit_code == 0  # a new run in the same folder starts a new log
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1]


# --- progress in a log --------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_a_log_is_a_line_every_few_seconds() -> None:
    """5,000 items at 100 items/s (50 s) report every 5 s: 10 lines and the last count, no \\r."""
    stream, clock = io.StringIO(), FakeClock()
    bar = progress_bar(total=5000, desc="indexing", unit="item", file=stream, interval=5.0, clock=clock)
    assert isinstance(bar, PlainProgress)
    for _ in range(200):
        clock.now += 0.25  # exact in binary, so the 5 s marks fall on whole steps
        bar.update(25)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 10
    assert lines[0] == "indexing: 500/5000 items (10%), 100 item/s"
    assert lines[-1] == "indexing: 5000/5000 items (100%), 100 item/s"


def test_progress_wraps_an_iterable_and_shows_postfix() -> None:
    stream, clock = io.StringIO(), FakeClock()
    seen = []
    bar = progress_bar(range(3), desc="epoch 1/2", file=stream, clock=clock)
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss="0.500")
    bar.close()
    assert seen == [0, 1, 2] and stream.getvalue() == "epoch 1/2: 3/3 it (100%), loss 0.500\n"
    with progress_bar(total=None, desc="shards", unit="shard", file=io.StringIO(), clock=clock) as bar:
        bar.update(2)
        assert bar.line(clock.now + 4) == "shards: 2 shards, 0.5 shard/s"


def test_progress_in_a_terminal_is_tqdms_bar_and_disabled_is_silent() -> None:
    from tqdm import tqdm

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_bar(total=3, file=Terminal()), tqdm)
    stream = io.StringIO()
    bar = progress_bar(range(3), disable=True, file=stream)
    assert list(bar) == [0, 1, 2] and stream.getvalue() == ""
