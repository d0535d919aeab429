"""Wall time of a whole ``houseprice run``: cold (empty artifact root and cache), then warm
(the same run again: every stage Cached), and Prefect's per-task overhead.

Each run is a fresh ``houseprice run`` process, as a user starts it. The cold run starts the
local Prefect API server that runs keep (``HOUSEPRICE_API_KEEP_S``, default 600 s); the warm
run finds it. ``warm_own_server_s`` is the warm run again with a server of its own
(``HOUSEPRICE_API_KEEP_S=0``): a run more than the keep time after the last one. The Prefect
home is created first, by a no-op flow timed apart as ``prefect_home_init_s`` (the very
first run on a machine also creates Prefect's database: a one-off cost). The overhead per
task is measured separately: a flow of 50 no-op tasks on the same ephemeral API, divided by
50.

    python benchmarks/run.py [--config FILE] [--data DIR] [--artifacts s3://BUCKET/PREFIX]

With ``--artifacts`` the artifacts go to a fresh prefix under that bucket URL (credentials and
endpoint from the AWS variables) and this machine's copies of them to a fresh local cache, so
the cold run reads nothing left by another.

Prints one JSON line with ``cold_s``, ``warm_s``, ``warm_over_cold``, ``tasks``,
``overhead_per_task_s``, ``selected`` and the OOF scores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, cli_env, timed  # noqa: E402

OVERHEAD = """
import time
from prefect import flow, task

@task
def noop(i):
    return i

@flow
def many(n):
    return [noop(i) for i in range(n)]

many(2)  # start the API and warm up
t = time.perf_counter()
many(50)
print("per-task", (time.perf_counter() - t) / 50)
"""


def stop_kept(env: dict[str, str]) -> None:
    """Stop the local API the runs kept in this Prefect home."""
    import subprocess

    subprocess.run([sys.executable, "-c", "from flows.commands.server import stop_kept_api; "
                    "stop_kept_api()"], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--artifacts", help="an object store URL instead of a temp folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**cli_env(Path(tmp) / "prefect"), "HOUSEPRICE_CACHE": f"{tmp}/store-cache",
               "HOUSEPRICE_API_KEEP_S": "600"}
        root = (f"{args.artifacts.rstrip('/')}/bench-{uuid.uuid4().hex[:8]}" if args.artifacts
                else f"{tmp}/artifacts")
        # --verbose: Prefect's task lines on the output, where the Cached ones are counted
        cmd = ["run", "--verbose", "--data-url", args.data, "--artifacts", root,
               "--data-dir", f"{tmp}/cache"]
        if args.config:
            cmd += ["--config", args.config]
        init, _, _ = timed(["-c", "from prefect import flow\nflow(lambda: None)()"], env)
        print(f"Prefect home created in {init:.1f} s", flush=True)
        cold, out, _ = timed(cmd, env)
        print(f"cold run: {cold:.1f} s", flush=True)
        try:
            warm, _, warm_out = timed(cmd, env)
            cached = len(re.findall(r"Finished in state Cached", warm_out))
            tasks = len(re.findall(r"Task run '[^']+' - Finished in state", warm_out))
            print(f"warm run: {warm:.1f} s ({cached} of {tasks} task runs Cached)", flush=True)
        finally:
            stop_kept(env)  # before its Prefect home is deleted
        own, _, _ = timed(cmd, {**env, "HOUSEPRICE_API_KEEP_S": "0"})
        print(f"warm run, server of its own: {own:.1f} s", flush=True)
        _, over_out, _ = timed(["-c", OVERHEAD], env)
        per_task = float(re.search(r"per-task ([0-9.e-]+)", over_out).group(1))
    summary = out.strip().splitlines()[-1]
    scores = {
        "oof_log_rmse_clean": float(re.search(r"([0-9.]+) without the \d* ?outliers", summary)[1]),
        "oof_log_rmse_all": float(re.search(r"out-of-fold log RMSE ([0-9.]+)", summary)[1]),
    }
    print(summary)
    print(json.dumps({
        "prefect_home_init_s": round(init, 1), "cold_s": round(cold, 1), "warm_s": round(warm, 1),
        "warm_over_cold": round(warm / cold, 3), "warm_own_server_s": round(own, 1),
        "warm_own_server_over_cold": round(own / cold, 3), "tasks": tasks, "cached": cached,
        "overhead_per_task_s": round(per_task, 4),
        "selected": re.search(r"selected (\S+)", summary)[1], **scores,
        "artifacts": "bucket" if args.artifacts else "local folder", "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
