"""The supervisor meets the runtime at one typed seam: the Spawner protocol (supervisor.spawner),
implemented in full by the runtime's adapter and by the tests' fake, and reached through the
top-level ``nsruntime`` package only."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mypy import api as mypy

import supervisor

SUPERVISOR = Path(supervisor.__file__).resolve().parent
REPO = SUPERVISOR.parent

_BOTH_SIDES = '''
from nsruntime import Container, Creating
from supervisor.spawner import Created, Creation, NsRuntime, Spawner
from tests.supervisor.conftest import FakeContainer, FakeCreation, FakeRuntime


def both(real: NsRuntime, fake: FakeRuntime, c: Container, fc: FakeContainer, m: Creating, fm: FakeCreation) -> None:
    spawners: list[Spawner] = [real, fake]
    created: list[Created] = [c, fc]
    creations: list[Creation] = [m, fm]
    print(spawners, created, creations)
'''


@pytest.mark.slow
def test_the_runtime_and_the_fake_implement_the_whole_seam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check = tmp_path / "both_sides.py"
    check.write_text(_BOTH_SIDES)
    monkeypatch.chdir(REPO)  # where mypy finds tests.supervisor.conftest
    out, err, status = mypy.run(["--strict", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"),
                                 str(check)])
    assert (status, out, err) == (0, "Success: no issues found in 1 source file\n", "")


def _submodule_imports(path: Path) -> list[str]:
    """The nsruntime submodules the file imports (``nsruntime.lean``, ``nsruntime.zygote`` ...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("nsruntime.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("nsruntime."):
            found.append(str(node.module))
    return found


def test_the_supervisor_takes_runtime_names_from_the_nsruntime_package_only() -> None:
    found = {f"{p.relative_to(REPO)}: {m}" for p in SUPERVISOR.rglob("*.py") for m in _submodule_imports(p)}
    assert found == set()


def test_the_config_and_its_converters_load_neither_trio_nor_structlog() -> None:
    # nsinitctl takes parse_signal from supervisor.config and must start fast
    code = "import sys; import supervisor.config; print(sorted({'trio', 'structlog'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    assert out == "[]\n"
