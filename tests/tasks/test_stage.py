from __future__ import annotations

import pytest

from tasks.config import DataConfig, PipelineConfig, TrainConfig, candidate
from tasks.stage import StageError, failing_as, stage_version
from tasks.storage.artifacts import ArtifactRef


def ref(version):
    return ArtifactRef(root="/a", stage="tensorize", version=version)


def test_version_is_content_derived():
    cand = candidate(name="m", kind="mlp")
    base = {"data": ref("x"), "candidate": cand, "config": TrainConfig()}
    assert stage_version("train", base) == stage_version("train", dict(base))
    assert stage_version("train", {**base, "data": ref("y")}) != stage_version("train", base)
    changed = {**base, "candidate": candidate(name="m", kind="mlp", lr=0.5)}
    assert stage_version("train", changed) != stage_version("train", base)
    assert stage_version("select", base) != stage_version("train", base)


def test_where_and_how_do_not_change_the_version():
    cand = candidate(name="m", kind="mlp")
    a = {"data": ArtifactRef(root="/a", stage="t", version="x"), "candidate": cand,
         "config": TrainConfig(device="cpu"), "root": "/a"}
    b = {"data": ArtifactRef(root="/b", stage="t", version="x"), "candidate": cand,
         "config": TrainConfig(device="auto"), "root": "/b"}
    assert stage_version("train", a) == stage_version("train", b)
    import torch

    assert not torch.cuda.is_available()  # the suite hides any GPU (tests/conftest.py)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        stage_version("train", {**a, "config": TrainConfig(device="cuda")})
    d1 = DataConfig(url="http://one/", cache_dir="/c1")
    d2 = DataConfig(url="/mirror", cache_dir="/c2", retries=0)
    assert stage_version("download", {"data": d1}) == stage_version("download", {"data": d2})


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"train": {"n_splits": 1}}, "train.n_splits"),
        ({"candidates": [{"name": "m", "kind": "mlp", "lr": 0}]}, "candidates.0.mlp.lr"),
        ({"candidates": [{"name": "m", "kind": "linear", "epochs": 0}]},
         "candidates.0.linear.epochs"),
        ({"candidates": [{"name": "m", "kind": "mlp", "activation": "gelu"}]},
         "candidates.0.mlp.activation"),
        ({"candidates": [{"name": "m", "kind": "mlp", "dropout": 1.0}]},
         "candidates.0.mlp.dropout"),
        ({"candidates": [{"name": "m", "kind": "mlp", "hidden": []}]},
         "needs at least one hidden layer"),
        ({"candidates": [{"name": "m", "kind": "ridge"}, {"name": "m", "kind": "lasso"}]},
         "candidates"),
        ({"candidates": [], "search": []}, "at least one candidate"),
        ({"search": [{"base": {"name": "r", "kind": "ridge"}, "grid": {"alpha": [0]}}]},
         "search value for alpha is invalid"),
        ({"search": [{"base": {"name": "r", "kind": "ridge"}, "grid": {"depth": [1]}}]},
         "field 'depth' does not belong to kind ridge"),
        ({"candidates": [{"name": "mlp-00", "kind": "mlp"}]}, "candidate names must be unique"),
        ({"trian": {}}, "trian"),
    ],
)
def test_invalid_config_names_the_field(update, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        PipelineConfig.model_validate(update)
    first = err.value.errors()[0]
    assert ".".join(str(p) for p in first["loc"]) == field or field in first["msg"]


def test_failing_as_names_the_stage():
    with pytest.raises(StageError, match=r"^stage 'train' failed: boom$"), failing_as("train"):
        raise ValueError("boom")


def test_a_library_upgrade_gives_new_versions(monkeypatch):
    """The libraries whose arithmetic shapes a stage's output (major.minor) are part of its
    version: an upgraded torch gives train and select new versions, and leaves download's
    and preprocess's alone."""
    from tasks import stage

    before = {s: stage.code_version(s) for s in stage.STAGE_CODE}
    real = stage.library_version
    monkeypatch.setattr(stage, "library_version",
                        lambda name: "99.0" if name == "torch" else real(name))
    stage.code_version.cache_clear()
    try:
        after = {s: stage.code_version(s) for s in stage.STAGE_CODE}
    finally:
        stage.code_version.cache_clear()
    changed = {s for s in before if before[s] != after[s]}
    assert changed == {"train", "select"}


def _data_imports(path):
    """The ``tasks.data`` modules a source file imports, as paths under ``tasks/``."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tasks.data."):
            out.add(node.module.removeprefix("tasks.").replace(".", "/") + ".py")
    return out


def test_every_data_module_a_stage_reads_is_in_its_code_version():
    """Editing a data module a stage's code imports (directly or through another) gives
    that stage a new version, instead of reusing what the old code wrote."""
    from tasks import stage

    for name, files in stage.STAGE_CODE.items():
        seen, todo = set(files), list(files)
        while todo:
            for dep in _data_imports(stage.TASKS_DIR / todo.pop()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        missing = {f for f in seen if f.startswith("data/")} - set(files)
        if name != "download":  # its output is fixed by the files' hashes alone
            assert not missing, (name, sorted(missing))
