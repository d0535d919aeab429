"""Speedup of 2 local Dask workers over the default (thread) task runner, on the same run.

Both are a cold ``houseprice run`` (default config unless ``--config``) on fresh artifact
roots and Prefect homes, one after the other on this machine; the download cache is shared
and filled first, so neither pays for the network.

    python benchmarks/dask.py [--config FILE] [--data DIR]

Prints one JSON line with ``threads_s``, ``dask_s``, ``speedup`` and both selected models.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, cli_env, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for runner in ("threads", "dask"):
            cmd = ["run", "--task-runner", runner, "--data-url", args.data,
                   "--data-dir", f"{tmp}/cache", "--artifacts", f"{tmp}/{runner}/artifacts"]
            if args.config:
                cmd += ["--config", args.config]
            wall, out, _ = timed(cmd, cli_env(Path(tmp) / runner / "prefect"))
            summary = out.strip().splitlines()[-1]
            results[runner] = (wall, re.search(r"selected (\S+)", summary)[1],
                               re.search(r"model (\w+)\)", summary)[1])
            print(f"{runner}: {wall:.1f} s, {summary}", flush=True)
    (t_s, t_sel, t_ver), (d_s, d_sel, d_ver) = results["threads"], results["dask"]
    print(json.dumps({"threads_s": round(t_s, 1), "dask_s": round(d_s, 1),
                      "speedup": round(t_s / d_s, 2), "dask_workers": 2,
                      "same_model": t_ver == d_ver and t_sel == d_sel,
                      "selected": t_sel, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
