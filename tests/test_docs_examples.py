"""The Python API page's examples run as written, in order, in one namespace (as a reader would paste them), and
what they return is what the page says: the recipes' results as a notebook reads them."""

from __future__ import annotations

import json
import os
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
    compared = namespace["c"]
    assert {row["arm"] for row in compared.metrics["runs"]} == {"linear_probe", "two_stage"}
    assert len(compared.runs) == 2 and compared.load_model().output_shape == (None, 4)
    val = {run: json.loads(pathlib.Path(run, "metrics.json").read_text())["val_accuracy"] for run in compared.runs}
    assert val[compared._best_run()] == max(val.values())  # load_model(): the arm with the best val accuracy
    distilled = namespace["d"]
    assert distilled.metrics["models"][0]["role"] in ("teacher", "student")
    assert distilled.load_model().output_shape == (None, 4)
    forgot = namespace["f"]
    assert [s["strategy"] for s in forgot.metrics["strategies"]] == ["naive", "replay"]
    assert all(len(s["R"]) == 2 for s in forgot.metrics["strategies"])  # two tasks: (a, b), (c, d)
    assert forgot.load_model().output_shape[-1] == 4
    assert os.path.isfile(os.path.join(namespace["path"], "model.tflite"))
    assert (tmp_path / "runs").is_dir() and (tmp_path / "saved_models").is_dir()
    assert namespace["report"].loaded and not namespace["report"].problems()
