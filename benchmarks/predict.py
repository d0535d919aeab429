"""Streaming batch predict: 1,000,000 rows of Parquet through ``houseprice predict``.

Builds the input by resampling the Kaggle test rows (seeded, with replacement, new unique
Ids), then runs ``houseprice predict`` in a child process and measures its wall time and peak
RSS (``ru_maxrss`` of the child). The model is the LATEST selected one under ``--artifacts``;
when there is none, ``houseprice run`` (default config, or ``--config``) trains it there first.

    python benchmarks/predict.py [--rows N] [--artifacts DIR] [--config FILE] [--chunk-size N]

Prints a summary, then one JSON line with ``rows``, ``rows_per_s``, ``peak_rss_mib``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kaggle_house"


def build_input(test_csv: Path, rows: int, path: Path, seed: int = 0) -> None:
    """``rows`` rows resampled from ``test_csv``, written in row groups of 100k."""
    test = pd.read_csv(test_csv)
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        chunk = test.iloc[rng.integers(0, len(test), n)].reset_index(drop=True)
        chunk["Id"] = np.arange(start, start + n, dtype=np.int64) + 1
        table = pa.Table.from_pandas(chunk, preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table.cast(writer.schema))
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    parser.add_argument("--chunk-size", type=int, default=50_000)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--config", help="config to train with when there is no model yet")
    args = parser.parse_args()
    # A training run here gets a Prefect API of its own, not one kept after the benchmark.
    env = {"HOUSEPRICE_API_KEEP_S": "0", **os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "flows.cli"]
    arts = Path(args.artifacts)
    if not (arts / "select" / "LATEST").is_file():
        print(f"no selected model under {arts}: training the default one first", flush=True)
        extra = ["--config", args.config] if args.config else []
        subprocess.run([*cli, "run", "--artifacts", str(arts), "--data-url", args.data, *extra],
                       check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "input.parquet", Path(tmp) / "predictions.csv"
        t0 = time.perf_counter()
        build_input(Path(args.data) / "kaggle_house_pred_test.csv", args.rows, src)
        print(f"built {args.rows} rows ({src.stat().st_size / 2**20:.0f} MiB Parquet) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        log = Path(tmp) / "predict.log"
        with open(log, "w") as fh:
            child = subprocess.Popen(
                [*cli, "predict", str(src), "--out", str(out), "--artifacts", str(arts),
                 "--chunk-size", str(args.chunk_size)],
                env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
            )
            # wait4 gives this child's own peak RSS (ru_maxrss, KiB on Linux).
            _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        peak = usage.ru_maxrss / 1024
        lines = log.read_text().strip().splitlines()
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"houseprice predict failed: {lines[-1] if lines else status}")
        with open(out) as fh:
            n_out = sum(1 for _ in fh) - 1
        assert n_out == args.rows, f"{n_out} predictions for {args.rows} rows"
        summary = lines[-1]
        print(summary)
    rate = args.rows / wall
    print(f"{args.rows} rows in {wall:.1f} s (child process, start-up included): "
          f"{rate:,.0f} rows/s, peak RSS {peak:.0f} MiB")
    print(json.dumps({"rows": args.rows, "seconds": round(wall, 2), "rows_per_s": round(rate),
                      "peak_rss_mib": round(peak), "chunk_size": args.chunk_size,
                      "model": summary.split("(model ")[-1].rstrip(")")}))


if __name__ == "__main__":
    main()
