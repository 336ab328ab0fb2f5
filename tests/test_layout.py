"""scripts/check_imports.py: the package has no import cycle, and the checker finds one where there is one."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_imports.py"
_spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
assert _spec is not None and _spec.loader is not None
check_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_imports)


@dataclass
class Result:
    returncode: int
    stdout: str


def check(*args: str | Path) -> Result:
    """The script's main, in-process (the fast tier starts no subprocess)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = check_imports.main([str(a) for a in args])
    return Result(code, out.getvalue())


@pytest.mark.slow
def test_the_script_runs_as_ci_runs_it() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--deferred"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no import cycle (imports, deferred ones included)\n0 imports against the layers" in result.stdout


@pytest.mark.parametrize("mode", [[], ["--deferred"]])
def test_the_package_has_no_import_cycle(mode: list[str]) -> None:
    result = check(*mode)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no import cycle" in result.stdout
    assert "\nimport cycle" not in result.stdout


def test_it_lists_each_module_with_its_line_count() -> None:
    out = check().stdout
    lines = {
        line.split()[1]: line for line in out.splitlines() if line.split()[1:2] and line.split()[1].endswith(".py")
    }
    atomic = ROOT / "retrieval" / "atomic.py"
    assert lines["retrieval/atomic.py"].split()[0] == str(len(atomic.read_text().splitlines()))
    assert len(lines) == len(list((ROOT / "retrieval").rglob("*.py")))


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "pkg" / name).write_text(text)
    return root / "pkg"


def test_a_module_level_cycle_fails_with_the_path_and_lines(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import os\n\nfrom .b import x\n",
            "b.py": "from pkg.c import y\nx = 1\n",
            "c.py": "from . import a\ny = 2\n",
            "d.py": "from .a import x\n",  # reaches the cycle but is not on it
        },
    )
    result = check(package)
    assert result.returncode == 1
    assert (
        "import cycle (module-level imports) among pkg.a, pkg.b, pkg.c: pkg.a (line 3) -> pkg.b (line 1) -> "
        "pkg.c (line 1) -> pkg.a"
    ) in result.stdout
    assert "pkg.d" not in result.stdout.split("import cycle")[1]


def test_a_deferred_cycle_counts_only_with_deferred(tmp_path: Path) -> None:
    """What model.py and pretrained.py had: one side's import inside a function."""
    package = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "model.py": (
                "class Encoder: ...\n\ndef load():\n    from .pretrained import load_hf\n    return load_hf()\n"
            ),
            "pretrained.py": "from .model import Encoder\n\ndef load_hf(): ...\n",
        },
    )
    assert check(package).returncode == 0
    result = check("--deferred", package)
    assert result.returncode == 1
    assert "pkg.model (line 4) -> pkg.pretrained (line 1) -> pkg.model" in result.stdout


def test_type_checking_imports_and_outside_imports_are_no_edges(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from typing import TYPE_CHECKING\nimport json\nif TYPE_CHECKING:\n    from .b import B\n",
            "b.py": "from .a import json\nclass B: ...\n",
        },
    )
    assert check("--deferred", package).returncode == 0


def test_subpackages_resolve(tmp_path: Path) -> None:
    """The target layout has folders: `from ..index import store` in pkg/models/load.py reaches pkg.index.store."""
    package = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "models/__init__.py": "",
            "models/load.py": "from ..index import store\n",
            "index/__init__.py": "",
            "index/store.py": "from ..models.load import x\n",
        },
    )
    result = check(package)
    assert result.returncode == 1
    assert "among pkg.index.store, pkg.models.load" in result.stdout


def test_big_modules_are_flagged_and_fail_only_when_strict(tmp_path: Path) -> None:
    package = write_package(tmp_path, {"__init__.py": "", "big.py": "x = 1\n" * 401, "small.py": "x = 1\n" * 400})
    result = check(package)
    assert result.returncode == 0
    assert "   401  pkg/big.py  over 400" in result.stdout and "   400  pkg/small.py\n" in result.stdout
    assert check("--strict-size", package).returncode == 1


def test_the_stages_depend_one_way() -> None:
    result = check("--deferred")
    assert "\n0 imports against the layers (data < evaluation < models < train < index" in result.stdout


def test_an_import_up_a_layer_fails_and_names_it(tmp_path: Path) -> None:
    """What data/augment.py did: data imported a config from models, while models import data."""
    package = write_package(
        tmp_path,
        {
            "__init__.py": "from .models import load\n",  # the public API may reach any stage
            "errors.py": "",
            "base.py": "from .models.load import x\n",  # a top-level module sits below every stage
            "data/__init__.py": "",
            "data/augment.py": "from ..errors import E\n\ndef f():\n    from ..models.config import Augment\n",
            "models/__init__.py": "",
            "models/load.py": "from ..data import augment\nx = 1\n",
            "models/config.py": "Augment = 1\n",
        },
    )
    result = check("--layers", "data,models", package)
    assert result.returncode == 1
    assert "1 imports against the layers (data < models)" in result.stdout  # the deferred one counts with --deferred
    assert "pkg.base (line 1) imports pkg.models.load: a top-level module may not depend on stage models" in (
        result.stdout
    )
    result = check("--deferred", "--layers", "data,models", package)
    assert "pkg.data.augment (line 4) imports pkg.models.config: stage data may not depend on stage models" in (
        result.stdout
    )
    assert result.returncode == 1
    result = check("--layers", "models", package)
    assert "pkg.data.augment is in stage data, which the layer list does not name (models)" in result.stdout
