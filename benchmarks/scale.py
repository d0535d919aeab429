"""How a cold ``houseprice run`` grows with the number of training rows: wall seconds per
stage, peak RSS and artifact size, per row count and config.

    python benchmarks/scale.py [--rows 1460 14600 146000 1460000] [--config configs/fast.toml ...]
                               [--task-runner dask]
    python benchmarks/scale.py --plot LINES.jsonl OUT.png   # the saved lines as a plot

The training files are made from the Kaggle rows: N rows drawn with replacement (seed 0), each
area column and the price multiplied by exp(e), e ~ N(0, 0.03) drawn per value and rounded as
the file writes them, Ids from 10,000,001 on (never the test file's); 1,460 rows is the Kaggle
file itself. The Kaggle test file is predicted. Each run is a fresh process with an empty
artifact root, download cache and Prefect home (its own Prefect API server, so a run's
start-up is in its time).

Prints a line per run as it ends, then one JSON line per run: ``rows``, ``config``,
``wall_s``, ``cpu_s`` (user and system seconds of all its processes: on a shared machine
steadier than wall time), ``stages_s`` (each stage from the previous one's end to its own;
download from the process's start, so it holds the start-up: imports and the Prefect API
server; train: every candidate's task), ``peak_rss_mib`` (the largest process of the run:
the flow's), ``peak_anon_mib`` (the flow process's anonymous memory, sampled every 0.2 s:
its RSS without the pages of files it maps, such as the fold base, which the kernel can
drop and read again), and ``artifacts_mib``. The figures are this machine's; say which when quoting
them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

# The repository root, not this folder: this folder's ``dask.py`` would hide the package
# from a process that imports this module (the test suite does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import DATA, ROOT, cli_env  # noqa: E402

TRAIN_CSV = DATA / "kaggle_house_pred_train.csv"
AREAS = ("LotArea", "MasVnrArea", "BsmtFinSF1", "BsmtFinSF2", "BsmtUnfSF", "TotalBsmtSF",
         "1stFlrSF", "2ndFlrSF", "LowQualFinSF", "GrLivArea", "GarageArea", "WoodDeckSF",
         "OpenPorchSF", "EnclosedPorch", "3SsnPorch", "ScreenPorch", "PoolArea", "LotFrontage")
STAGES = ("download", "preprocess", "tensorize", "train", "select", "predict")


def make_rows(n: int, out: Path, seed: int = 0) -> Path:
    """``n`` training rows resampled from the Kaggle file (see the module), as CSV."""
    if n == 1460:
        return TRAIN_CSV
    base = pd.read_csv(TRAIN_CSV)
    rng = np.random.default_rng(seed)
    rows = base.iloc[rng.integers(0, len(base), n)].reset_index(drop=True)
    for col in (*AREAS, "SalePrice"):
        if col in rows:
            jitter = np.exp(rng.normal(0.0, 0.03, n))
            rows[col] = (rows[col] * jitter).round()
    rows["SalePrice"] = rows["SalePrice"].astype("int64")
    rows["Id"] = np.arange(10_000_001, 10_000_001 + n)
    rows.to_csv(out, index=False)
    return out


def stage_seconds(log: str, start: float) -> dict[str, float]:
    """Per stage, from the previous stage's end (the run's start first) to its last task's
    end, read from the timestamps of Prefect's "Finished in state" lines."""
    day = dt.date.fromtimestamp(start)
    ends: dict[str, float] = {}
    prev, shift = start, 0.0
    for m in re.finditer(r"^(\d\d:\d\d:\d\d\.\d+) \| \w+ +\| Task run '([a-z]+)[^']*' - "
                         r"Finished in state", log, re.M):
        t = dt.datetime.combine(day, dt.time.fromisoformat(m[1])).timestamp() + shift
        if t < prev - 43_200:  # the lines carry no date: a run past midnight goes on a day
            shift += 86_400
            t += 86_400
        prev = max(prev, t)
        ends[m[2]] = max(ends.get(m[2], 0.0), t)
    out, last = {}, start
    for stage in STAGES:
        if stage in ends:
            out[stage] = round(ends[stage] - last, 1)
            last = ends[stage]
    return out


def _anon_kib(pid: int) -> int:
    """A process's anonymous resident memory (``RssAnon``, KiB): its RSS without the pages
    of files it maps (the fold base), which the kernel can drop and read again."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"RssAnon:\s+(\d+)", status)
    return int(found[1]) if found else 0


def run_once(rows: int, config: str | None, tmp: Path, runner: str = "threads") -> dict:
    train = make_rows(rows, tmp / f"train-{rows}.csv")
    env = cli_env(tmp / "prefect")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--verbose", "--data-url", str(DATA),
           "--train", str(train), "--artifacts", str(tmp / "arts"), "--data-dir",
           str(tmp / "cache"), "--task-runner", runner]
    if config:
        cmd += ["--config", config]
    start = time.time()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=err, text=True)
        anon = 0  # the flow process's own memory, sampled: RSS less the files it maps
        while child.poll() is None:
            anon = max(anon, _anon_kib(child.pid))
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, child.returncode, out.read(), err.read())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        sys.exit(f"{rows} rows, {config or 'default'}: failed: " + " | ".join(tail))
    # The largest process this benchmark has waited for (the flow's: its server is smaller).
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss / 1024
    cpu = usage.ru_utime + usage.ru_stime  # of every process of the run: less noisy than wall
    size = sum(p.stat().st_size for p in (tmp / "arts").rglob("*") if p.is_file())
    summary = proc.stdout.strip().splitlines()[-1]
    score = re.search(r"out-of-fold log RMSE ([0-9.]+)", summary)
    return {"rows": rows, "config": config or "default", "task_runner": runner,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "stages_s": stage_seconds(proc.stdout + proc.stderr, start),
            "peak_rss_mib": round(peak), "peak_anon_mib": round(anon / 1024),
            "artifacts_mib": round(size / 2**20, 1),
            "oof_log_rmse_all": float(score[1]) if score else None,
            "cpus": os.cpu_count()}


def plot(lines: Path, out: Path) -> None:
    """Wall seconds and peak RSS against rows (log-log), one line per config, task runner
    and machine, from the JSON lines this script printed (saved to ``lines``; of several
    lines of the same rows, config, runner and machine, the last). A line's ``machine``
    (added by hand) names a machine other than the first sessions'; machines differ in
    speed, so their points are not joined."""
    from matplotlib.figure import Figure

    def series(r: dict) -> tuple[str, ...]:
        return (r["config"], r.get("task_runner", "threads"), *(
            [r["machine"]] if r.get("machine") else []))

    newest: dict[tuple, dict] = {}  # a later line of the same run replaces an earlier one
    for line in lines.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            newest[(*series(r), r["rows"])] = r
    runs = list(newest.values())
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for key, ax, label in (("wall_s", axes[0], "wall seconds (cold run)"),
                           ("peak_rss_mib", axes[1], "peak RSS, MiB")):
        for name in sorted({series(r) for r in runs}):
            pts = sorted((r["rows"], r[key]) for r in runs if series(r) == name)
            ax.plot(*zip(*pts, strict=True), marker="o", label=" · ".join(name))
        ax.set(xscale="log", yscale="log", xlabel="training rows", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(8 * 1024, color="grey", linestyle="--", linewidth=1)
    axes[1].set_ylim(top=max(12 * 1024, 1.2 * max(r["peak_rss_mib"] for r in runs)))
    axes[1].annotate("8 GiB", (min(r["rows"] for r in runs), 8 * 1024 * 1.05), color="grey")
    # below the panels: inside one it hid the points of the largest runs
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    fig.suptitle(f"benchmarks/scale.py, {runs[0].get('cpus')} CPU cores")
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1460, 14600, 146000, 1460000])
    parser.add_argument("--config", nargs="+", default=["configs/fast.toml", None],
                        help="configs to run (the default config: 'default')")
    parser.add_argument("--task-runner", choices=["threads", "dask"], default="threads",
                        help="dask: two local workers, each opening the matrix from the "
                        "artifact store")
    parser.add_argument("--plot", nargs=2, metavar=("LINES", "PNG"), type=Path,
                        help="only draw the JSON lines saved in LINES as a plot")
    args = parser.parse_args()
    if args.plot:
        return plot(*args.plot)
    configs = [None if c in (None, "default") else c for c in args.config]
    results = []
    for config in configs:
        for rows in args.rows:
            # A fresh process tree per run: ru_maxrss of children is a high-water mark, so
            # each run is measured from a child of its own.
            with tempfile.TemporaryDirectory() as tmp:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", str(rows), config or "default", tmp,
                     args.task_runner],
                    capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(out.stderr.strip() or out.stdout.strip())
                result = json.loads(out.stdout.strip().splitlines()[-1])
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"{rows:>9,} rows, {result['config']}: {result['wall_s']} s, "
                  f"{result['peak_rss_mib']} MiB peak, {result['artifacts_mib']} MiB of "
                  f"artifacts, stages {result['stages_s']}", flush=True)
            results.append(result)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--one":
        rows, config, tmp, runner = int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5]
        print(json.dumps(run_once(rows, None if config == "default" else config, tmp, runner)))
    else:
        main()
