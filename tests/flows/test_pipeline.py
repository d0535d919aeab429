"""End to end on the real data over loopback HTTP, against a real (temporary) Prefect API:
what runs, what comes back Cached, and what the dashboard gets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.pipeline import house_price_pipeline
from tasks.config import candidate
from tasks.promote import PROMOTION_KEY
from tasks.report import CURVES_KEY, METRICS_KEY, MODEL_CARD_KEY
from tests.conftest import small_config, task_states

STAGES = ["download", "preprocess", "tensorize", "train", "select", "predict"]


def _filter(state):
    return FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))


def stage_states(state) -> dict[str, list[str]]:
    """Stage name -> state names of its task runs in the flow run behind ``state``."""
    return task_states(state.state_details.flow_run_id)


def run(cfg, flow=house_price_pipeline, **kwargs):
    state = flow(cfg, return_state=True, **kwargs)
    return state, stage_states(state)


@pytest.fixture(scope="module")
def first_run(prefect_api, data_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    cfg = small_config(root / "artifacts", data_server.url, root / "cache",
                       submission=str(root / "out" / "submission.csv"))
    state, states = run(cfg)
    return cfg, state, states


def test_cold_run_completes_every_stage_and_writes_a_submission(first_run, real_data):
    cfg, state, states = first_run
    assert state.is_completed(), state.message
    for stage in STAGES:
        assert states[stage] and set(states[stage]) == {"Completed"}, (stage, states)
    assert len(states["train"]) == len(cfg.all_candidates())
    result = state.result()
    sub = pd.read_csv(cfg.submission)
    assert list(sub.columns) == ["Id", "SalePrice"] and len(sub) == 1459
    test_ids = pd.read_csv(real_data / "kaggle_house_pred_test.csv")["Id"]
    assert sub["Id"].tolist() == test_ids.tolist()
    assert sub["SalePrice"].gt(0).all()
    # The headline score by hand: the selected model's out-of-fold prediction of every
    # training row against the log of its price in the raw file.
    oof = pd.read_parquet(Path(cfg.artifacts_dir) / "select" / result["model_version"]
                          / "oof.parquet")
    raw = pd.read_csv(real_data / "kaggle_house_pred_train.csv")
    truth = np.log(raw.set_index("Id").loc[oof["Id"], "SalePrice"].to_numpy())
    assert len(oof) == 1460 and oof["Id"].is_unique
    assert result["oof_log_rmse_all"] == pytest.approx(
        np.sqrt(np.mean((oof["pred_log_price"].to_numpy() - truth) ** 2)), rel=1e-9)
    assert 0.1 < result["oof_log_rmse_all"] < 0.2  # and a sane model: the book gets ~0.16
    for stage in STAGES:
        versions = [p for p in (Path(cfg.artifacts_dir) / stage).iterdir() if p.is_dir()]
        assert versions and all((v / "manifest.json").is_file() for v in versions)


def test_dashboard_gets_metrics_table_and_model_card(first_run):
    cfg, state, _ = first_run
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(flow_run_filter=_filter(state))
    by_key = {a.key: a for a in arts}
    # The flow run's own: its page's Artifacts tab lists only those of no task run.
    for key in (METRICS_KEY, MODEL_CARD_KEY, CURVES_KEY, PROMOTION_KEY):
        assert by_key[key].task_run_id is None, key
        assert by_key[key].flow_run_id == state.state_details.flow_run_id, key
    assert by_key[METRICS_KEY].type == "table"
    assert by_key[MODEL_CARD_KEY].type == "markdown"
    selected = state.result()["selected"]
    assert selected in str(by_key[METRICS_KEY].data)
    # The dashboard shows the columns in the order of the first row's keys: reading order
    rows = json.loads(by_key[METRICS_KEY].data)
    columns = list(rows[0])
    assert columns[:4] == ["candidate", "selected", "oof all rows", "oof w/o outliers"]
    assert columns[-3:] == ["blend weight", "predict rows/s", "status"]
    assert columns.index("fold 1") < columns.index("fold 2") < columns.index("blend weight")
    assert f"# Selected model: {selected}" in by_key[MODEL_CARD_KEY].data
    # Its name tells it apart in a list of runs: data, config, then what it selected.
    with get_client(sync_client=True) as client:
        name = client.read_flow_run(state.state_details.flow_run_id).name
    result = state.result()
    assert name.startswith("data ") and name.endswith(
        f" · {selected} {result['oof_log_rmse_all']:.4f} · promoted"), name


def test_identical_rerun_executes_no_stage(first_run):
    cfg, state, _ = first_run
    again, states = run(cfg)
    assert again.is_completed()
    for stage in STAGES:
        assert set(states[stage]) == {"Cached"}, (stage, states)
    assert again.result()["model_version"] == state.result()["model_version"]


def test_changed_training_parameter_reruns_only_train_select_predict(first_run):
    cfg, _, _ = first_run
    update = {"exclude_outliers": not cfg.train.exclude_outliers}
    _, states = run(cfg.model_copy(update={"train": cfg.train.model_copy(update=update)}))
    for stage in ["download", "preprocess", "tensorize"]:
        assert set(states[stage]) == {"Cached"}, (stage, states)
    for stage in ["train", "select", "predict"]:
        assert set(states[stage]) == {"Completed"}, (stage, states)


def test_changed_folds_refit_the_fold_preprocessors_too(first_run):
    """The fold seed cuts other folds: each fold's preprocessor (tensorize) is refitted,
    the all-rows one (preprocess) is not."""
    cfg, _, _ = first_run
    assert cfg.preprocess.per_fold
    _, states = run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})}))
    assert set(states["download"]) == set(states["preprocess"]) == {"Cached"}, states
    for stage in ["tensorize", "train", "select", "predict"]:
        assert set(states[stage]) == {"Completed"}, (stage, states)


def test_changed_epochs_retrain_only_the_torch_candidates(first_run):
    cfg, _, _ = first_run
    _, states = run(cfg.with_epochs(cfg.candidates[0].epochs + 1))
    n_torch = sum(c.epochs_field for c in cfg.all_candidates())
    assert sorted(states["train"]) == (["Cached"] * (len(cfg.all_candidates()) - n_torch)
                                       + ["Completed"] * n_torch)


def test_deleted_artifact_is_rebuilt_not_served_from_cache(first_run, tmp_path):
    cfg, _, _ = first_run
    tensorized = Path(cfg.artifacts_dir) / "tensorize"
    aside = tmp_path / "aside"
    aside.mkdir()
    moved = [Path(shutil.move(v, aside / v.name)) for v in tensorized.iterdir() if v.is_dir()]
    try:
        _, states = run(cfg)
    finally:  # the shared root as other tests found it: versions this run did not rebuild
        for version in moved:
            if not (tensorized / version.name).exists():
                shutil.move(version, tensorized / version.name)
    assert states["tensorize"] == ["Completed"]
    assert set(states["download"]) == set(states["train"]) == {"Cached"}


def test_rerun_after_failure_skips_completed_stages(prefect_api, data_server, tmp_path):
    cfg = small_config(tmp_path / "artifacts", data_server.url, tmp_path / "cache", epochs=3)
    (tmp_path / "artifacts").mkdir()
    blocker = tmp_path / "artifacts" / "train"
    blocker.write_text("a file where the train stage keeps its versions")
    failed, states = run(cfg)
    assert failed.is_failed()
    assert "stage 'train' failed" in failed.message
    for stage in ["download", "preprocess", "tensorize"]:
        assert states[stage] == ["Completed"]
    assert "select" not in states

    blocker.unlink()  # the fault is fixed; rerun
    again, states = run(cfg)
    assert again.is_completed(), again.message
    for stage in ["download", "preprocess", "tensorize"]:
        assert states[stage] == ["Cached"], (stage, states)
    for stage in ["train", "select", "predict"]:
        assert set(states[stage]) == {"Completed"}, (stage, states)


def test_flow_parameters_are_an_editable_pydantic_schema():
    schema = house_price_pipeline.parameters.model_dump()
    assert list(schema["properties"]) == ["config", "from_stage"]
    assert schema["properties"]["from_stage"]["anyOf"][0]["enum"][3] == "train"
    defs = schema["definitions"]
    assert defs["MLPConfig"]["properties"]["activation"]["enum"] == [
        "relu", "sigmoid", "tanh"]
    assert "activation" not in defs["LassoConfig"]["properties"]
    union = schema["definitions"]["PipelineConfig"]["properties"]["candidates"]["items"]
    assert union["discriminator"]["propertyName"] == "kind"
    assert defs["TrainConfig"]["properties"]["n_splits"]["minimum"] == 2


def test_added_candidate_trains_alone(first_run):
    cfg, _, _ = first_run
    extra = candidate(name="mlp-small", kind="mlp", hidden=(16,), epochs=cfg.candidates[0].epochs)
    more = cfg.model_copy(update={"candidates": (*cfg.candidates, extra)})
    state, states = run(more)
    assert state.is_completed()
    assert sorted(states["train"]) == ["Cached"] * len(cfg.all_candidates()) + ["Completed"]
    assert set(states["tensorize"]) == {"Cached"}


def test_copied_artifact_root_serves_its_own_files(first_run, tmp_path):
    cfg, state, _ = first_run
    moved = tmp_path / "copy"
    shutil.copytree(cfg.artifacts_dir, moved)
    stamps = {p: p.stat().st_mtime_ns for p in moved.rglob("model.pt")}
    copy_state, _ = run(cfg.model_copy(update={"artifacts_dir": str(moved), "submission": None}))
    assert copy_state.is_completed(), copy_state.message
    result = copy_state.result()
    assert result["submission"].startswith(str(moved))
    assert result["model_version"] == state.result()["model_version"]
    assert {p: p.stat().st_mtime_ns for p in moved.rglob("model.pt")} == stamps  # reused


DIVERGING = {"name": "too-hot", "kind": "linear", "optimizer": "sgd",
             "lr": 1e6, "epochs": 5}


def test_diverged_candidate_is_marked_and_selection_goes_on(first_run):
    cfg, _, _ = first_run
    more = cfg.model_copy(update={"candidates": (*cfg.candidates,
                                                 candidate(**DIVERGING))})
    state, _ = run(more)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["diverged"] == ["too-hot"] and "too-hot" not in result["components"]
    board = json.loads((Path(cfg.artifacts_dir) / "select" / result["model_version"]
                        / "leaderboard.json").read_text())
    (row,) = [r for r in board["table"] if r["candidate"] == "too-hot"]
    assert row["status"].startswith("diverged: loss or gradient became non-finite")
    assert row["mean"] is None and row["selected"] == ""


def test_run_fails_naming_the_reason_when_no_candidate_is_healthy(first_run):
    cfg, _, _ = first_run
    only_bad = cfg.model_copy(update={"candidates": (candidate(**DIVERGING),),
                                      "search": ()})
    state, states = run(only_bad)
    assert state.is_failed()
    assert "stage 'select' failed: no healthy candidate to select from: too-hot diverged" \
        in state.message
    assert len(states["train"]) == 1 and "predict" not in states


def test_bad_training_rows_stop_the_run_before_any_training(real_data, serve_dir, prefect_api,
                                                            tmp_path):
    import hashlib

    src = tmp_path / "src"
    src.mkdir()
    train = pd.read_csv(real_data / "kaggle_house_pred_train.csv")
    train.loc[10, "Id"] = train.loc[11, "Id"]  # a duplicated Id
    train.to_csv(src / "kaggle_house_pred_train.csv", index=False)
    shutil.copy(real_data / "kaggle_house_pred_test.csv", src)
    files = {role: {"name": f"kaggle_house_pred_{role}.csv",
                    "sha1": hashlib.sha1((src / f"kaggle_house_pred_{role}.csv").read_bytes())
                    .hexdigest()} for role in ("train", "test")}
    server = serve_dir(src)
    cfg = small_config(tmp_path / "artifacts", server.url, tmp_path / "cache")
    cfg = cfg.model_copy(update={"data": type(cfg.data).model_validate(
        {**cfg.data.model_dump(), "files": files})})
    state, states = run(cfg)
    assert state.is_failed()
    assert (f"stage 'preprocess' failed: train.csv: duplicate Id values [{train.loc[11, 'Id']}]"
            in state.message)
    assert "train" not in states and not (tmp_path / "artifacts" / "train").exists()


def test_from_stage_recomputes_it_and_everything_after(first_run):
    cfg, first, _ = first_run
    model_dir = Path(cfg.artifacts_dir) / "select" / first.result()["model_version"]
    before = (model_dir / "manifest.json").stat().st_mtime_ns
    state, states = run(cfg, from_stage="train")
    assert state.is_completed(), state.message
    for stage in ["download", "preprocess", "tensorize"]:
        assert set(states[stage]) == {"Cached"}, (stage, states)
    for stage in ["train", "select", "predict"]:
        assert set(states[stage]) == {"Completed"}, (stage, states)
    # Rebuilt in place (same inputs, same version), and still intact; recomputed with the
    # same seed, it selects the same model with the same scores.
    again, before_result = state.result(), first.result()
    assert again["model_version"] == before_result["model_version"]
    for key in ("selected", "components", "oof_log_rmse_all", "oof_log_rmse_clean",
                "mean_valid_log_rmse"):
        assert again[key] == before_result[key], key
    assert (model_dir / "manifest.json").stat().st_mtime_ns > before
    from tasks.storage.artifacts import ArtifactRef, require

    require(ArtifactRef(root=cfg.artifacts_dir, stage="select",
                        version=first.result()["model_version"]))


def test_dashboard_names_say_what_each_run_is(first_run):
    """Read back from the Prefect API: task runs named after what they do, no suffixes."""
    from tasks.config import run_name

    cfg, state, _ = first_run
    with get_client(sync_client=True) as client:
        names = {r.name for r in client.read_task_runs(flow_run_filter=_filter(state))}
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    train = {f"train[{c.name}]" for c in cfg.all_candidates()}
    assert names == {"fetch", "download", "preprocess", "tensorize", "select", "predict",
                     "promote", "publish"} | train
    # data and config, then (once it ends) what it selected, its score and the verdict
    assert flow_run.name.startswith(run_name(cfg) + " · ") and flow_run.name.startswith("data ")


def test_candidates_of_one_shape_train_as_one_group_and_a_newcomer_alone(first_run):
    """Two MLPs of one shape train in one task (stacked); a third joining the group later
    is trained alone: the cached two keep their artifacts (not retrained)."""
    cfg, _, _ = first_run
    shape = {"kind": "mlp", "hidden": (16,), "epochs": 4, "batch_size": 64}
    pair = (candidate(name="g-1", lr=1e-3, **shape), candidate(name="g-2", lr=3e-3, **shape))
    grouped = cfg.model_copy(update={"candidates": (*cfg.candidates, *pair)})
    state, states = run(grouped)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        names = {r.name for r in client.read_task_runs(flow_run_filter=_filter(state))}
    assert "train[g-1, g-2]" in names
    _, again = run(grouped)  # the group's cache record (its members' references) is a hit
    assert set(again["train"]) == {"Cached"}, again
    root = Path(cfg.artifacts_dir) / "train"
    made = {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/manifest.json")}
    third = candidate(name="g-3", lr=5e-4, dropout=0.1, **shape)
    state, states = run(grouped.model_copy(update={"candidates": (*grouped.candidates, third)}))
    assert state.is_completed(), state.message
    after = {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/manifest.json")}
    assert {v: t for v, t in after.items() if v in made} == made  # nothing rewritten
    assert len(set(after) - set(made)) == 1  # only the newcomer's artifact is new
    result = state.result()
    board = json.loads((Path(cfg.artifacts_dir) / "select" / result["model_version"]
                        / "leaderboard.json").read_text())["leaderboard"]
    assert {"g-1", "g-2", "g-3"} <= {m["candidate"] for m in board}


def test_whether_to_fit_the_outliers_is_each_candidates_choice(first_run):
    """``exclude_outliers`` on a candidate (what the default search varies): its fits leave
    the two outliers out, the others' do not, and it is still scored on all rows, so select
    compares the two choices on the rows a user meets."""
    from tasks.train import stack_groups

    cfg, _, _ = first_run
    by_kind = {c.kind: c for c in cfg.candidates}
    clean = [by_kind[k].model_copy(update={"name": f"{k}-clean-fit", "exclude_outliers": True})
             for k in ("lasso", "mlp")]
    assert len(stack_groups([by_kind["mlp"], clean[1]])) == 2  # other rows: another stack
    state, _ = run(cfg.model_copy(update={"candidates": (*cfg.candidates, *clean)}))
    assert state.is_completed(), state.message
    import torch

    root = Path(cfg.artifacts_dir)
    # This run's train artifacts, from its model's lineage (a by-name alias points at the
    # latest one built under that name, maybe by another test's config).
    ckpt = torch.load(root / "select" / state.result()["model_version"] / "model.pt",
                      weights_only=True)
    arts = {name: root / "train" / version
            for version, name in ckpt["lineage"]["train_candidates"].items()}
    outliers = pd.read_parquet(arts["lasso"] / "oof.parquet")
    outlier_ids = sorted(outliers.loc[outliers["outlier"], "Id"].unique().tolist())
    assert len(outlier_ids) == 2
    for name, left_out in [("lasso", []), ("mlp", []), ("lasso-clean-fit", outlier_ids),
                           ("mlp-clean-fit", outlier_ids)]:
        art = arts[name]
        assert json.loads((art / "folds.json").read_text())["excluded_from_fit"] == left_out
        metrics = json.loads((art / "metrics.json").read_text())
        assert metrics["n_rows_all"] == 1460 and metrics["oof_log_rmse_all"] is not None


def test_planted_cache_records_run_no_code_and_are_rebuilt(first_run, tmp_path, monkeypatch,
                                                            caplog):
    """A pickle-serializer record and a JSON record naming a foreign class, planted in the
    root's cache records, are misses: nothing runs, the stages run again (finding their
    intact artifacts) and good records replace the planted ones."""
    from tests.tasks.storage.test_records import foreign_class_record, pickle_record, planted_module

    cfg, state, _ = first_run
    records = Path(cfg.artifacts_dir) / ".prefect-results"
    pickled, imported = tmp_path / "pickled", tmp_path / "imported"
    monkeypatch.syspath_prepend(str(tmp_path))
    planted = {"preprocess": pickle_record(pickled),
               "tensorize": foreign_class_record(planted_module(tmp_path, imported))}
    originals = {}  # every version's record of the two stages (earlier tests made several)
    for path in records.glob("houseprice-*"):
        stage = path.name.split("-")[1]
        if stage in planted:
            originals[path] = path.read_bytes()
            path.write_bytes(planted[stage])
    again, states = run(cfg)
    for path, data in originals.items():  # other configs' records: as they were
        if path.read_bytes() in planted.values():
            path.write_bytes(data)
    assert again.is_completed(), again.message
    assert not pickled.exists() and not imported.exists()
    assert states["preprocess"] == states["tensorize"] == ["Completed"], states
    assert set(states["download"]) == set(states["train"]) == {"Cached"}, states
    assert "ignoring Prefect cache record houseprice-preprocess" in caplog.text
    _, states = run(cfg)  # the planted records were replaced by good ones
    assert states["preprocess"] == states["tensorize"] == ["Cached"], states


def test_check_finds_a_real_root_healthy(first_run, capsys):
    from flows.cli import main

    cfg, _, _ = first_run
    code = main(["check", "--artifacts", cfg.artifacts_dir])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "houseprice: check: ok:" in out and " 0 cache records" not in out, out


def test_train_task_durations_are_their_own_work_not_a_wait(first_run):
    """The train tasks share one fit thread: a task enters Running when the thread is free
    for it, so the durations the dashboard shows add up to about the training's wall time,
    not to many times it (each task waiting behind the others' fits)."""
    cfg, _, _ = first_run
    state = house_price_pipeline(cfg.with_epochs(cfg.candidates[0].epochs + 2),
                                 return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_task_runs(flow_run_filter=_filter(state))
                if r.name.startswith("train[") and r.state.name == "Completed"]
    assert len(runs) >= 2
    own = sum((r.end_time - r.start_time).total_seconds() for r in runs)
    wall = (max(r.end_time for r in runs) - min(r.start_time for r in runs)).total_seconds()
    assert own < 1.5 * wall, (own, wall, [(r.name, r.start_time, r.end_time) for r in runs])


def test_a_local_dask_cluster_runs_the_pipeline(prefect_api, data_server, tmp_path,
                                                real_data, monkeypatch):
    """``--task-runner dask`` without an address: a LocalCluster of 2 worker processes
    trains the candidates; the headline score agrees with its saved predictions."""
    from flows.pipeline import with_task_runner

    # The workers inherit the API from the environment, as under 'houseprice run' (which
    # sets it); else each would start a Prefect server of its own.
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)

    fast = {"candidates": [{"name": "lasso", "kind": "lasso", "alpha": 5e-4, "max_iter": 2000},
                           {"name": "ridge", "kind": "ridge", "alpha": 10.0}],
            "search": [], "train": {"n_splits": 3}}
    cfg = small_config(tmp_path / "arts", data_server.url, tmp_path / "cache", **fast)
    state = with_task_runner("dask")(cfg, return_state=True)
    assert state.is_completed(), state.message
    states = stage_states(state)
    assert sorted(states["train"]) == ["Completed", "Completed"], states
    result = state.result()
    oof = pd.read_parquet(Path(cfg.artifacts_dir) / "select" / result["model_version"]
                          / "oof.parquet")
    raw = pd.read_csv(real_data / "kaggle_house_pred_train.csv").set_index("Id")
    truth = np.log(raw.loc[oof["Id"], "SalePrice"].to_numpy())
    assert result["oof_log_rmse_all"] == pytest.approx(
        np.sqrt(np.mean((oof["pred_log_price"].to_numpy() - truth) ** 2)), rel=1e-9)
