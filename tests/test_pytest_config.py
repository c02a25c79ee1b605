"""The suite's own pytest settings (pyproject.toml): a misspelt marker stops the run, and a warning
fails the test that raised it, so neither goes unread in a long log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _pytest(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_probe.py"
    test.write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"), str(test)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )


def test_a_misspelt_marker_stops_the_run(tmp_path: Path) -> None:
    result = _pytest(tmp_path, "import pytest\n\n@pytest.mark.slwo\ndef test_marked():\n    pass\n")
    assert result.returncode == 2, result.stdout
    assert "'slwo' not found in `markers` configuration option" in result.stdout


def test_a_warning_fails_the_test_that_raised_it(tmp_path: Path) -> None:
    source = "import warnings\n\ndef test_warns():\n    warnings.warn('careful', DeprecationWarning)\n"
    result = _pytest(tmp_path, source)
    assert result.returncode == 1, result.stdout
    assert "FAILED" in result.stdout and "DeprecationWarning: careful" in result.stdout
