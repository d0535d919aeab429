"""A new kind added exactly as the docs say (one module, one line in ``KINDS``), in a copy of
the code: it trains, is selected in a blend, predicts through ``houseprice predict`` (the plan's
generic runtime: k nearest neighbours has no compiled form), and its predict speed is in the
result table."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from tests.conftest import TEST_CSV, unmeasured, write_config

REPO = Path(__file__).resolve().parents[2]
KIND_DOC = REPO / "docs" / "kinds.md"


def _recipe() -> tuple[str, str, str]:
    """The docs' module (its path, its text) and the line they say to add to ``KINDS``."""
    text = KIND_DOC.read_text()
    block = re.search(r"## Adding a kind.*?```python\n(.*?)```", text, re.S).group(1)
    lines = block.splitlines()
    path = lines[0].removeprefix("# ").strip()
    entry = re.search(r'KINDS = \{\.\.\., ("knn": KNNConfig)\}', block).group(1)
    module = "\n".join(line for line in lines if "KINDS = {" not in line) + "\n"
    return path, module, entry


def test_a_kind_added_as_the_docs_say_trains_blends_and_predicts(prefect_api, data_server,
                                                                  tmp_path):
    code = tmp_path / "code"
    for part in ("tasks", "flows", "data"):
        shutil.copytree(REPO / part, code / part,
                        ignore=shutil.ignore_patterns("__pycache__", "cache"))
    path, module, entry = _recipe()
    (code / path).write_text(module)
    registry = code / "tasks" / "kinds" / "__init__.py"
    text = registry.read_text()
    text = text.replace("KINDS: dict[str, type[CandidateConfig]] = {",
                        "from tasks.kinds.knn import KNNConfig  # noqa: E402\n\n"
                        "KINDS: dict[str, type[CandidateConfig]] = {\n    " + entry + ",", 1)
    registry.write_text(text)

    env = {**unmeasured(os.environ), "PREFECT_API_URL": prefect_api,
           "HOUSEPRICE_DATA_URL": data_server.url,
           "HOUSEPRICE_DATA_DIR": str(tmp_path / "cache")}
    config = write_config(tmp_path / "c.json", search=[], candidates=[
        {"name": "lasso", "kind": "lasso", "alpha": 5e-4, "max_iter": 2000},
        {"name": "knn", "kind": "knn", "n_neighbors": 10}])
    arts = tmp_path / "arts"

    def houseprice(*args):
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=code, env=env,
                              capture_output=True, text=True, timeout=600)

    proc = houseprice("run", "--config", str(config), "--artifacts", str(arts),
                      "--folds", "3", "--final", "ensemble")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    # Selected in a blend, with a weight of its own.
    weights = dict(re.findall(r"(\w+) (0\.\d+)", summary.split("[")[1].split("]")[0]))
    assert summary.startswith("houseprice: selected blend") and float(weights["knn"]) > 0, \
        summary
    # Its predict speed is in the result table (rows/s, the column after the weight).
    row = next(line.split() for line in proc.stdout.splitlines()
               if line.strip().startswith("knn"))
    assert int(row[-2].replace(",", "")) > 0, row
    # The copy's code, not the installed one, ran: the installed tasks have no knn kind.
    assert "knn" not in (REPO / "tasks" / "kinds" / "__init__.py").read_text()

    # houseprice predict: the plan's generic runtime loads the kind's own members.
    rows = tmp_path / "rows.csv"
    pd.read_csv(TEST_CSV).head(40).to_csv(rows, index=False)
    out = tmp_path / "pred.csv"
    proc = houseprice("predict", str(rows), "--artifacts", str(arts), "--out", str(out),
                      "--model", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = pd.read_csv(out)
    assert len(pred) == 40 and pred["SalePrice"].between(30_000, 800_000).all()
    plan = next(arts.glob("select/*/plan.json")).read_text()
    assert '"kind": "generic"' in plan and '"kind": "knn"' in plan
