"""Helpers shared by the benchmarks: paths and timing a ``houseprice`` child process."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kaggle_house"


def cli_env(prefect_home: Path) -> dict[str, str]:
    """Environment for a ``houseprice`` child: its own ephemeral Prefect API and home (a
    server per run, unless the benchmark keeps one: HOUSEPRICE_API_KEEP_S)."""
    env = {"HOUSEPRICE_API_KEEP_S": "0", **os.environ, "PYTHONPATH": str(ROOT),
           "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return env


def timed(args: list[str], env: dict[str, str]) -> tuple[float, str, str]:
    """Run ``python -m flows.cli *args`` (or ``python -c`` when args[0] == '-c'); return
    (wall seconds, stdout, stdout+stderr). Exits with the child's last line on failure."""
    cmd = [sys.executable, *(args if args[0] == "-c" else ["-m", "flows.cli", *args])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        errors = [line for line in lines if line.startswith("houseprice: error")] or lines[-5:]
        sys.exit(f"failed ({proc.returncode}): {' '.join(args)}: " + " | ".join(errors))
    return wall, proc.stdout, proc.stdout + proc.stderr


def run_args(doc: str, what: str) -> argparse.Namespace:
    """``--artifacts DIR`` (a default run's artifact root, required) and ``--only NAME ...``
    (which ``what`` to run; default all): the arguments of the scripts that score variants
    on a run's own folds."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--only", nargs="*", help=f"{what} names to run (default: all)")
    return ap.parse_args()
