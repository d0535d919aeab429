"""The pipeline with its artifacts in a bucket (a real S3 protocol server on loopback):
cached across processes that share nothing but the bucket, and trained on Dask workers that
share no disk with the flow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import small_config, start_server, stop, task_states, write_config

# Linear kinds only, few epochs: the point here is where things are stored, not accuracy.
CANDIDATES = (
    {"name": "lasso", "kind": "lasso", "alpha": 5e-4, "max_iter": 2000},
    {"name": "ridge", "kind": "ridge", "alpha": 10.0},
    {"name": "linear", "kind": "linear", "lr": 0.01, "weight_decay": 1e-3, "epochs": 4},
)
STAGES = ("download", "preprocess", "tensorize", "train", "select", "predict")


def _config(root: str, data_server, cache: Path):
    return small_config(root, data_server.url, cache, epochs=4, candidates=CANDIDATES,
                        search=())


@pytest.fixture(scope="module")
def bucket_run(s3, prefect_api, data_server, tmp_path_factory):
    from flows.pipeline import house_price_pipeline

    root = f"s3://{s3.bucket()}/hp"
    cfg = _config(root, data_server, tmp_path_factory.mktemp("s3-cache"))
    state = house_price_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    return cfg, state


def test_every_stage_is_in_the_bucket_with_its_manifest(s3, bucket_run):
    from tasks.storage.artifacts import ArtifactRef, verify

    cfg, state = bucket_run
    result = state.result()
    base = cfg.artifacts_dir.removeprefix("s3://")
    fs = s3.fs()
    for stage in STAGES:
        versions = [p.rsplit("/", 1)[1] for p in fs.ls(f"{base}/{stage}")
                    if not p.endswith("LATEST")]
        assert len(versions) == (3 if stage == "train" else 1), (stage, versions)
        for v in versions:
            manifest = json.loads(fs.cat(f"{base}/{stage}/{v}/manifest.json"))
            assert manifest["version"] == v and manifest["files"]
            assert verify(ArtifactRef(root=cfg.artifacts_dir, stage=stage, version=v)) == []
    assert fs.cat(f"{base}/select/LATEST").decode().strip() == result["model_version"]
    production = json.loads(fs.cat(f"{base}/production/CURRENT"))
    assert production["model"] == result["model_version"]
    assert fs.ls(f"{base}/.prefect-results")  # Prefect's cache records beside them


def test_a_second_process_with_nothing_local_is_all_cached_and_predicts_from_the_bucket(
        s3, bucket_run, prefect_api, data_server, real_data, tmp_path):
    cfg, state = bucket_run
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "HOME": str(tmp_path / "home"),
           "PREFECT_HOME": str(tmp_path / "prefect"), "HOUSEPRICE_CACHE": str(tmp_path / "c")}
    config = write_config(tmp_path / "config.json", candidates=list(CANDIDATES), search=[],
                          train={"repeats": 1})

    def houseprice(*args):
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)

    proc = houseprice("run", "--verbose", "--config", str(config), "--data-url",
                      data_server.url, "--data-dir", str(tmp_path / "data"),
                      "--artifacts", cfg.artifacts_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    finished = [line for line in log.splitlines() if "Finished in state" in line
                and any(f"'{s}" in line for s in STAGES)]
    assert len(finished) == len(STAGES) + 2, finished  # 3 train tasks
    assert all("Cached" in line for line in finished), finished
    assert f"model {state.result()['model_version']}" in proc.stdout

    out = tmp_path / "pred.csv"
    proc = houseprice("predict", str(real_data / "kaggle_house_pred_test.csv"), "--out",
                      str(out), "--artifacts", cfg.artifacts_dir)
    assert proc.returncode == 0, proc.stderr
    expected = pd.read_csv(Path(state.result()["submission"]))
    pd.testing.assert_frame_equal(pd.read_csv(out), expected, rtol=1e-6)


@pytest.mark.parametrize(("bucket", "env", "words"), [
    ("no-such-bucket", {}, "the bucket does not exist (no bucket 'no-such-bucket'); create "
     "it or fix --artifacts"),
    (None, {"AWS_SECRET_ACCESS_KEY": "wrong"}, "access refused (The request signature we "
     "calculated does not match"),
    (None, {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "is unreachable ("),
], ids=["no bucket", "wrong credentials", "unreachable"])
def test_an_unusable_bucket_is_one_line_exit_1_and_nothing_written(s3, tmp_path, bucket, env,
                                                                    words):
    bucket = bucket or s3.bucket()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--artifacts",
                           f"s3://{bucket}/hp"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, **env,
                                             "HOUSEPRICE_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"houseprice: error: artifact store s3://{bucket}/hp"), lines
    assert words in lines[0]
    assert not (tmp_path / "c").exists()
    if bucket != "no-such-bucket":
        assert s3.fs().ls(bucket) == []  # nothing written


@pytest.fixture
def dask_cluster(s3, prefect_api, tmp_path):
    """A scheduler and 2 workers, each in its own directory with its own HOME: nothing of
    the flow's working directory, caches or artifacts is visible to them."""
    bin_dir = Path(sys.executable).parent
    procs = []

    def start(name, args):
        home = tmp_path / name
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HOUSEPRICE_", "PREFECT_"))}
        env.update(HOME=str(home), PREFECT_HOME=str(home / "prefect"),
                   PREFECT_API_URL=prefect_api, OMP_NUM_THREADS="1",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
        home.mkdir(exist_ok=True)
        log = open(home / "log.txt", "a")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([str(bin_dir / "dask"), *args], cwd=home, env=env,
                                       stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
        return home, procs[-1][0]

    def listening(port):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True

    port, _ = start_server(
        lambda port: start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port",
                                         str(port), "--no-dashboard"])[1],
        listening, tmp_path / "scheduler" / "log.txt", "dask scheduler")
    address = f"tcp://127.0.0.1:{port}"
    homes = [start(f"worker-{i}", ["worker", address, "--nthreads", "1", "--no-dashboard",
                                   "--local-directory", "."])[0] for i in range(2)]
    from distributed import Client

    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
        yield address, homes
    finally:
        for proc, log in procs:
            stop(proc)
            log.close()


def test_dask_workers_without_a_shared_disk_train_into_the_bucket(
        s3, bucket_run, dask_cluster, data_server, tmp_path):
    from flows.pipeline import with_task_runner

    cfg, state = bucket_run
    address, homes = dask_cluster
    on_dask = _config(f"s3://{s3.bucket()}/hp", data_server, tmp_path / "cache")
    dask_state = with_task_runner("dask", address)(on_dask, return_state=True)
    assert dask_state.is_completed(), dask_state.message
    train = task_states(dask_state.state_details.flow_run_id)["train"]
    assert set(train) == {"Completed"}  # trained afresh, over there
    ours, theirs = dask_state.result(), state.result()
    assert ours["selected"] == theirs["selected"]
    assert ours["model_version"] == theirs["model_version"]  # same inputs, same version
    # Dask workers run BLAS on one thread (OMP_NUM_THREADS=1), which changes the order of
    # float32 sums; scores agree to a few 1e-7, not bit for bit.
    assert ours["components"].keys() == theirs["components"].keys()
    for name, weight in ours["components"].items():
        assert weight == pytest.approx(theirs["components"][name], abs=1e-4)
    for key in ("oof_log_rmse_all", "oof_log_rmse_clean", "mean_valid_log_rmse"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key
    # the workers read their inputs from the bucket, through copies in their own homes
    copies = [list((h / ".cache" / "houseprice" / "stores").glob("*/tensorize/*"))
              for h in homes]
    assert any(copies), [list(h.rglob("*"))[:20] for h in homes]


def test_planted_cache_records_in_the_bucket_run_no_code(s3, bucket_run, tmp_path,
                                                          monkeypatch):
    """Whoever can write the bucket plants a pickle record and a foreign-class JSON record:
    the next run loads neither (no code runs), runs those stages again and completes."""
    from flows.pipeline import house_price_pipeline
    from tests.tasks.storage.test_records import foreign_class_record, pickle_record, planted_module

    cfg, _ = bucket_run
    fs, base = s3.fs(), cfg.artifacts_dir.removeprefix("s3://")
    records = {p.rsplit("/", 1)[1].split("-")[1]: p for p in fs.ls(f"{base}/.prefect-results")
               if p.rsplit("/", 1)[1].startswith("houseprice-")}
    pickled, imported = tmp_path / "pickled", tmp_path / "imported"
    monkeypatch.syspath_prepend(str(tmp_path))
    fs.pipe(records["preprocess"], pickle_record(pickled))
    fs.pipe(records["select"], foreign_class_record(planted_module(tmp_path, imported)))
    state = house_price_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    assert not pickled.exists() and not imported.exists()
    states = task_states(state.state_details.flow_run_id)
    assert states["preprocess"] == states["select"] == ["Completed"], states
    assert set(states["download"]) == {"Cached"}, states
