"""Shared fixtures: an isolated Prefect API, the real data over loopback HTTP, and one
trained pipeline run that several test modules read."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path

# Before Prefect is imported anywhere: its own home, no inherited server, quiet telemetry.
_TMP = Path(tempfile.mkdtemp(prefix="houseprice-tests-"))
os.environ["PREFECT_HOME"] = str(_TMP / "prefect-home")
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# A run without PREFECT_API_URL gets a server of its own that stops with it, not one kept
# for minutes after the test (tests/flows/test_server.py covers the kept one).
os.environ["HOUSEPRICE_API_KEEP_S"] = "0"
os.environ["HOUSEPRICE_ARTIFACTS"] = str(_TMP / "default-artifacts")
os.environ["HOUSEPRICE_DATA_DIR"] = str(_TMP / "default-cache")
os.environ["HOUSEPRICE_CACHE"] = str(_TMP / "store-cache")  # local copies of bucket objects
# The suite runs as on a machine without a GPU, on any machine (device "auto" would train
# on CUDA, whose float arithmetic differs); the GPU checks ask for it back (``gpu_env``).
_CUDA_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOUSEPRICE_TEST_DATA", REPO.parent / "shared/data/kaggle_house"))
TRAIN_CSV = DATA / "kaggle_house_pred_train.csv"
TEST_CSV = DATA / "kaggle_house_pred_test.csv"


# Coverage follows every Python subprocess (pyproject: patch = subprocess). Servers the
# fixtures start (Prefect's own, moto's) run none of this project's code: left unmeasured,
# they are not slowed by its tracer.
_COVERAGE_VARS = ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START")


def unmeasured(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in _COVERAGE_VARS}


def gpu_env() -> dict[str, str] | None:
    """The environment of a subprocess that sees this machine's GPUs, or None without one."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if _CUDA_DEVICES is not None:
        env["CUDA_VISIBLE_DEVICES"] = _CUDA_DEVICES
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           env=env, capture_output=True, text=True, timeout=120)
    return env if probe.stdout.strip() == "True" else None


def free_port() -> int:
    """A loopback port free just now (bound, then released): for a server started with
    ``start_server``, which takes another if someone else binds it first."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def refused_port():
    """A loopback port bound but never listening, for the test's duration: connections to
    it are refused, and no other process can take it meanwhile."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def start_server(start, ready, log: Path, what: str, attempts: int = 3,
                 timeout: float = 120.0):
    """Start a server on a free port: ``start(port)`` returns its Popen (in its own session),
    ``ready(port)`` whether it answers. A server that exits before answering (its port
    taken between choosing and binding it) is started again on another port. Returns
    (port, process); fails the test with the log's tail."""
    import signal
    import time

    for _ in range(attempts):
        port = free_port()
        proc = start(port)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if ready(port):
                    return port, proc
            except OSError:
                pass
            time.sleep(0.3)
        if proc.poll() is None:  # neither answering nor gone: no retry helps
            os.killpg(proc.pid, signal.SIGKILL)
            break
    pytest.fail(f"{what} did not start: " + log.read_text(errors="replace")[-2000:])


class DataServer:
    """A real HTTP server on 127.0.0.1 serving a directory, counting requests per path."""

    def __init__(self, directory: Path):
        self.requests: Counter[str] = Counter()
        self.bodies: Counter[str] = Counter()  # requests answered 200 with the file's body
        counter, bodies = self.requests, self.bodies

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                counter[self.path.lstrip("/")] += 1
                super().do_GET()

            def send_response(self, code, message=None):
                if code == 200:
                    bodies[self.path.lstrip("/")] += 1
                super().send_response(code, message)

            def log_message(self, *args):
                pass

        handler = functools.partial(Handler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The book's two CSVs (../shared/data/kaggle_house); missing them is an error, not a skip."""
    assert TRAIN_CSV.is_file() and TEST_CSV.is_file(), (
        f"real data not found under {DATA}; set HOUSEPRICE_TEST_DATA to the kaggle_house folder"
    )
    return DATA


@pytest.fixture(scope="session")
def data_server(real_data):
    server = DataServer(real_data)
    yield server
    server.close()


@pytest.fixture
def serve_dir():
    """Factory: serve any directory over loopback HTTP for one test."""
    servers = []

    def start(directory: Path) -> DataServer:
        servers.append(DataServer(directory))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (SQLite) for the whole session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    saved = {k: os.environ.pop(k) for k in _COVERAGE_VARS if k in os.environ}
    try:
        harness = prefect_test_harness(server_startup_timeout=60)
        harness.__enter__()  # its server subprocess starts here, unmeasured
    finally:
        os.environ.update(saved)
    try:
        yield PREFECT_API_URL.value()
    finally:
        harness.__exit__(None, None, None)


@pytest.fixture(scope="session")
def prefect_server(session_tmp):
    """A real ``prefect server start`` on a free loopback port, with its own PREFECT_HOME
    (bounded wait for health; stopped at the end). Yields its API URL."""
    import subprocess
    import sys
    import urllib.request

    env = {**unmeasured(os.environ), "PREFECT_HOME": str(session_tmp / "server-home"),
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    path = session_tmp / "prefect-server.log"
    log = open(path, "w")  # noqa: SIM115 - closed below

    def start(port):
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "server", "start",
             "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def ready(port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
            return r.status == 200

    try:
        port, proc = start_server(start, ready, path, "prefect server")
    except BaseException:
        log.close()
        raise
    url = f"http://127.0.0.1:{port}/api"
    yield url
    stop(proc)
    log.close()


def stop(proc) -> None:
    """Stop a subprocess started in its own session: SIGTERM, then SIGKILL after 20 s."""
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session", autouse=True)
def session_tmp() -> Path:
    """The session's temporary home (Prefect home, caches, artifacts), removed at the end."""
    yield _TMP
    shutil.rmtree(_TMP, ignore_errors=True)


def small_config(root: Path, url: str, cache: Path, epochs: int = 8, repeats: int = 1,
                 **overrides):
    """A quick PipelineConfig on the real data: default candidates, few epochs, one pass of
    the folds unless ``repeats``."""
    from tasks.config import PipelineConfig

    overrides.setdefault("candidates", TEST_CANDIDATES)
    overrides.setdefault("search", TEST_SEARCH)
    overrides["train"] = {"repeats": repeats, **overrides.get("train", {})}
    cfg = PipelineConfig(
        artifacts_dir=str(root), data={"url": url, "cache_dir": str(cache)}, **overrides
    )
    return cfg.with_epochs(epochs)


def write_config(path: Path, **overrides) -> Path:
    """A JSON config for ``houseprice run --config``: the small test candidates."""
    import json

    data = {"candidates": list(TEST_CANDIDATES), "search": list(TEST_SEARCH), **overrides}
    data["train"] = {"repeats": 1, **overrides.get("train", {})}
    path.write_text(json.dumps(data))
    return path


# Every kind of candidate, small enough for tests: torch linear and MLP (2 seeds averaged),
# lasso, a few boosting rounds, and a declared ridge search.
TEST_CANDIDATES = (
    {"name": "linear", "kind": "linear", "lr": 0.01, "weight_decay": 1e-3},
    {"name": "mlp", "kind": "mlp", "hidden": [32], "dropout": 0.1, "weight_decay": 1e-2,
     "seeds": 2},
    {"name": "lasso", "kind": "lasso", "alpha": 5e-4, "max_iter": 2000},
    {"name": "hgb", "kind": "hgb", "learning_rate": 0.1, "max_iter": 20},
)
# Each kind's own fields, written out (what a checkpoint's model_config holds): no field of
# another kind.
OWN_FIELDS = {
    "linear": {"name", "kind", "exclude_outliers", "batch_size", "clip_grad_norm", "epochs",
               "max_steps", "lr_schedule", "average_last", "halving", "stop_share",
               "init", "lr", "optimizer", "seeds", "weight_decay"},
    "lasso": {"name", "kind", "exclude_outliers", "alpha", "max_iter"},
    "ridge": {"name", "kind", "exclude_outliers", "alpha"},
    "hgb": {"name", "kind", "exclude_outliers", "l2_regularization", "learning_rate", "loss",
            "max_iter", "max_leaf_nodes", "min_samples_leaf", "max_fit_rows"},
}
OWN_FIELDS["mlp"] = OWN_FIELDS["linear"] | {"activation", "dropout", "hidden",
                                            "wide_alpha"}
TEST_SEARCH = (
    {"base": {"name": "ridge", "kind": "ridge"}, "grid": {"alpha": [3.0, 30.0]}},
)


@pytest.fixture(scope="session")
def trained(prefect_api, data_server, session_tmp):
    """One completed pipeline run; returns (config, flow result)."""
    from flows.pipeline import house_price_pipeline

    cfg = small_config(session_tmp / "trained-artifacts", data_server.url,
                       session_tmp / "trained-cache", repeats=2)
    return cfg, house_price_pipeline(cfg)


class S3Server:
    """moto's standalone S3 server on a loopback port, with signature checking on: one IAM
    user whose key the whole session uses (through the standard AWS variables, as a user
    would set them)."""

    def __init__(self, home: Path):
        import json
        import subprocess
        import sys
        import urllib.request

        # The first 4 requests (the IAM user, its policy and key, below) need no signature;
        # every later one is checked, so wrong credentials are refused as by AWS.
        env = {**unmeasured(os.environ), "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
        self.log = open(home / "moto.log", "w")  # noqa: SIM115 - closed in close()

        def start(port):
            return subprocess.Popen(
                [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                 str(port)], env=env, stdout=self.log, stderr=subprocess.STDOUT,
                start_new_session=True)

        def ready(port):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2).close()
            return True

        try:
            self.port, self.proc = start_server(start, ready, home / "moto.log", "moto server")
        except BaseException:
            self.log.close()
            raise
        self.endpoint = f"http://127.0.0.1:{self.port}"
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="houseprice")
        policy = iam.create_policy(PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        iam.attach_user_policy(UserName="houseprice", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="houseprice")["AccessKey"]
        self.env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                    "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                    "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        self._buckets = 0

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.env["AWS_ACCESS_KEY_ID"],
                                 secret=self.env["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_url=self.endpoint, use_listings_cache=False,
                                 skip_instance_cache=True)

    def bucket(self) -> str:
        """A new, empty bucket's name."""
        self._buckets += 1
        name = f"houseprice-{self._buckets}"
        self.fs().mkdir(name)
        return name

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


@pytest.fixture(scope="session")
def s3(session_tmp):
    """A real S3 protocol server on loopback for the session; its credentials and endpoint
    in this process's AWS variables (restored at the end)."""
    server = S3Server(session_tmp)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.close()


def task_states(flow_run_id, wait_s: float = 15.0) -> dict[str, list[str]]:
    """Stage name -> state names of the task runs of a flow run, read from the API. A task
    run's state reaches the API a moment after the run ends (a failed flow's last ones
    especially; a cached one may still read Running): read again until every one has a
    final state."""
    from flows.commands.run import recorded

    runs = recorded(flow_run_id, wait_s=wait_s, every_s=0.2)
    out: dict[str, list[str]] = {}
    for r in runs:
        out.setdefault(r.name.split("[")[0], []).append(r.state.name if r.state else "None")
    return out


def without_ranges(root: Path, version: str) -> None:
    """Make select version ``version`` under ``root`` what a model built before calibrated
    ranges is: no intervals.json, none listed in its manifest."""
    import json

    folder = Path(root) / "select" / version
    (folder / "intervals.json").unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["intervals.json"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
