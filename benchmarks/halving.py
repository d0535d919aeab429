"""Successive halving over the default search's MLP stacks, on a run's own folds and features:
the search's seconds and what it finds, for each number of rungs.

    python benchmarks/halving.py --artifacts DIR [--rungs 0 1 2] [--only STACK ...]

Reads the newest tensorize artifact under ``--artifacts`` (a run's per-fold preprocessors,
3 repeats x 5 folds; any config's run: only its tensorized rows are read). The candidates
are the default search's torch candidates, in the stacks the train stage forms; ``--only``
keeps the stacks whose first candidate is named. Prints one JSON line per number of rungs:
the seconds of every stack's cross-validation (no refits), the best candidate's all-rows
OOF log RMSE, how many candidates trained their whole budget, and whether the best of the
search without halving (the first line) is still the best.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.kinds import run_features  # noqa: E402
from tasks.config import PipelineConfig  # noqa: E402
from tasks.data.folds import fit_rows, make_folds  # noqa: E402
from tasks.train import stack_groups  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--rungs", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", help="stacks (by first candidate) to run")
    args = ap.parse_args()
    _, matrix, train, X = run_features(args.artifacts)
    y, logy = matrix.y, np.log(matrix.y)
    folds = make_folds(len(y), train.n_splits, train.seed, train.fold_scheme, train.repeats)
    # the train stage's rule for candidates without their own: the outliers left out or not
    outliers = np.isin(matrix.ids, matrix.meta.get("outlier_ids", []))
    fitted = fit_rows(folds, outliers if train.exclude_outliers else np.zeros(len(y), bool))
    torch_kinds = [c for c in PipelineConfig().all_candidates() if c.kind in ("mlp", "linear")]
    stacks = [s for s in stack_groups(torch_kinds) if not args.only or s[0].name in args.only]
    best_plain = None
    for rungs in args.rungs:
        start = time.perf_counter()
        scores, full = {}, 0
        for stack in stacks:
            specs = [c.model_copy(update={"halving": rungs}) for c in stack]
            cvs = type(specs[0]).cross_validate_stack(specs, X, y, train, folds, fitted,
                                                      lambda f: None)
            for c, cv in zip(specs, cvs, strict=True):
                pred = cv.oof_log_price
                scores[c.name] = float(np.sqrt(np.nanmean((pred - logy) ** 2)))
                full += cv.halving is None or not cv.halving["stopped"]
        best = min(scores, key=scores.get)
        best_plain = best_plain or best
        print(json.dumps({
            "rows": len(y), "rungs": rungs, "stacks": len(stacks), "candidates": len(scores),
            "seconds": round(time.perf_counter() - start, 1),
            "whole_budget": full, "best": best, "best_oof_log_rmse_all": round(scores[best], 4),
            "best_without_halving_kept": best == best_plain,
        }), flush=True)


if __name__ == "__main__":
    main()
