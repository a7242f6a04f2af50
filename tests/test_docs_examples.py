"""The Python API page's examples run as written, in order, in one namespace (as a reader would paste them)."""

from __future__ import annotations

import pathlib
import re


PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_the_python_api_page_runs(data_a_to_d, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 5
    folder = data_a_to_d
    monkeypatch.chdir(tmp_path)
    namespace = {"folder": folder}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)  # noqa: S102 (our own documentation)
    assert namespace["r"].metrics["test_accuracy"] >= 0.0
    assert (tmp_path / "runs").is_dir() and (tmp_path / "saved_models").is_dir()
    assert namespace["report"].loaded and not namespace["report"].problems()
