"""The documentation site builds without a warning: broken links, anchors and docstrings fail the test."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None,
    reason="mkdocs and mkdocstrings are not installed (pip install -e '.[docs]')",
)
def test_docs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    assert (tmp_path / "index.html").is_file()
    api = (tmp_path / "callbacks" / "clipping" / "index.html").read_text(encoding="utf-8")
    assert 'id="lightning_gradguard.GradientClipping"' in api, "the API reference of GradientClipping is rendered"
