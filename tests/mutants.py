"""The mutation check: plant one-line bugs in the core modules, one at a time, run the tests
that should catch each, and report which survive.

    .venv/bin/python -m tests.mutants            # every mutant (about 10 minutes on 2 cores)
    .venv/bin/python -m tests.mutants --list     # their names
    .venv/bin/python -m tests.mutants crossfit drift-once   # some of them

A mutant is caught when its tests fail; it survives when they pass. The unmutated code must
pass the same tests first (else "baseline fails", and the mutant counts as not checked).
The source file is restored after each mutant, also on Ctrl-C; bytecode goes to a temporary
folder, so no compiled mutant is ever loaded later. Exit status 1 when any mutant survives.
Not part of ``.ci/run``: it reruns test modules once per mutant.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str  # must occur exactly once in ``file``
    new: str
    tests: tuple[str, ...]  # pytest node ids or files that should catch it
    why: str


SELECT = "tests/tasks/test_select.py"
PROMOTE = "tests/tasks/test_promote.py"
ENGINE = "tests/tasks/kinds/test_engine.py"
PRE = "tests/tasks/data/test_features.py"
STATS = "tests/tasks/data/test_statistics.py"
_PLAN = "tests/tasks/inference/test_plan.py"
PLAN = (f"{_PLAN}::test_a_tree_compares_the_float32_row_with_the_float64_threshold",
        f"{_PLAN}::test_a_members_price_is_clamped_at_1_as_the_book_clamps")
FAST_SELECT = (f"{SELECT}::test_a_folds_blended_prediction_does_not_move_when_that_folds_"
               "prices_do", f"{SELECT}::test_the_blends_score_is_that_of_weights_fitted_on_"
               "the_other_folds", f"{SELECT}::test_auto_picks_mixed_unless_it_loses_more_"
               "than_max_loss", f"{SELECT}::test_blend_weights_are_non_negative_and_its_"
               "score_is_cross_fitted", f"{SELECT}::test_leaderboard_ranks_by_oof_score_and_"
               "puts_diverged_last")

MUTANTS = [
    # select: the headline score, the blend and the final form
    Mutant("crossfit", "tasks/select.py",
           "others = use & ~held & (repeat == repeat[held][0])",
           "others = use & (repeat == repeat[held][0])", FAST_SELECT,
           "blend weights fitted on the rows they then score"),
    Mutant("auto-inverted", "tasks/select.py",
           'if speed_floor or estimates["mixed"] <= estimates["ensemble"] + max_loss:',
           'if speed_floor or estimates["mixed"] > estimates["ensemble"] + max_loss:',
           FAST_SELECT, "select.final = auto picks the wrong form"),
    Mutant("auto-floor", "tasks/select.py",
           'if speed_floor or estimates["mixed"]', 'if estimates["mixed"]', FAST_SELECT,
           "auto keeps the slowest form under a speed floor"),
    Mutant("blend-negative", "tasks/select.py", "weights, _ = nnls(P, logy)",
           "weights = np.linalg.lstsq(P, logy, rcond=None)[0]", FAST_SELECT,
           "blend weights may be negative"),
    Mutant("blend-on-all-rows", "tasks/select.py",
           'use = clean if select_on == "clean" else np.ones(len(oof), bool)',
           "use = np.ones(len(oof), bool)", FAST_SELECT,
           "select.on = clean fits the blend on the outliers too"),
    Mutant("leaderboard-worst-first", "tasks/select.py",
           "return sorted(metrics, key=lambda m: (m[key] is None, m[key] or 0.0))",
           "return sorted(metrics, key=lambda m: (m[key] is None, -(m[key] or 0.0)))",
           FAST_SELECT, "the leaderboard ranks the worst candidate first"),
    Mutant("drop-fastest", "tasks/select.py",
           "use.remove(min(parts, key=rates.__getitem__))",
           "use.remove(max(parts, key=rates.__getitem__))", FAST_SELECT + (
               f"{SELECT}::test_a_blend_too_slow_for_the_floor_leaves_out_its_slowest_"
               "component",), "a blend too slow for the floor drops its fastest component"),
    Mutant("folds-unchecked", "tasks/select.py",
           "if len(f) != len(oof) or not all(", "if False and all(", (SELECT,),
           "candidates cut into other folds are blended"),
    Mutant("refits-unchecked", "tasks/select.py", "        if stale:\n", "        if False:\n",
           (SELECT,), "a final form needing refits train did not keep goes ahead"),
    # promote: the gate and the production history
    Mutant("gate-inverted", "tasks/promote.py", "better = theirs - ours >= min_improvement",
           "better = ours - theirs >= min_improvement", (PROMOTE,),
           "a worse challenger is promoted"),
    Mutant("gate-ignores-min-improvement", "tasks/promote.py",
           "better = theirs - ours >= min_improvement", "better = theirs - ours >= 0",
           (PROMOTE,), "promote.min_improvement has no effect"),
    Mutant("gate-unusable-kept", "tasks/promote.py",
           'return Decision(True, f"production model {champion.version} is not usable "',
           'return Decision(False, f"production model {champion.version} is not usable "',
           (PROMOTE,), "an unusable production model is never replaced"),
    Mutant("rollback-to-first", "tasks/promote.py", "back = stack[-2]", "back = stack[0]",
           (PROMOTE,), "rollback jumps to the first model instead of the one before"),
    Mutant("rollback-only-model", "tasks/promote.py", "if len(stack) < 2:",
           "if len(stack) < 1:", (PROMOTE,), "rolling back the only model ever is no error"),
    # plan: the compiled inference form
    Mutant("float32-threshold", "tasks/inference/plan.py",
           "thr[above] = np.nextafter(thr[above], np.float32(-np.inf))", "pass",
           PLAN, "a row on a rounded-up threshold goes left"),
    Mutant("plan-clamp", "tasks/kinds/base.py",
           'return np.maximum(out, 0.0) if target == "log" else np.log(np.maximum(out, 1.0))',
           'return out if target == "log" else np.log(np.maximum(out, 1.0))',
           PLAN, "a member's log price below 0 is not clamped"),
    # stage: versions and cache keys
    Mutant("version-ignores-params", "tasks/stage.py",
           '{"stage": stage, "code": _stage_code(stage, inputs), "params": params,',
           '{"stage": stage, "code": _stage_code(stage, inputs), "params": {},',
           ("tests/tasks/test_stage.py",), "a changed parameter reuses the old version"),
    Mutant("version-counts-where", "tasks/stage.py", "if name in _UNVERSIONED_INPUTS:",
           "if False:", ("tests/tasks/test_stage.py",),
           "where an artifact is written changes its version"),
    # artifacts and the store: what a version is, and what a name may be
    Mutant("hash-unchecked", "tasks/storage/store.py",
           "if sha256_file(name, opener=opener) != expected:", "if False:",
           ("tests/tasks/storage/test_artifacts.py",), "a damaged file passes as intact"),
    Mutant("unsafe-names", "tasks/storage/store.py",
           'return isinstance(name, str) and bool(name) and all(',
           'return isinstance(name, str) and bool(name) or all(',
           ("tests/tasks/storage/test_store.py", "tests/tasks/storage/test_artifacts.py"),
           "a manifest may name a path outside its version"),
    # features: what the models see
    Mutant("std-ddof0", "tasks/data/statistics.py", "std = np.sqrt(m2 / (n - 1))",
           "std = np.sqrt(m2 / n)", (PRE, STATS), "standardized with the population std"),
    Mutant("skew-both-tails", "tasks/data/features.py",
           "and raw.skew[j] > self.skew_threshold:",
           "and abs(raw.skew[j]) > self.skew_threshold:", (PRE, STATS),
           "left-skewed columns are log-transformed too"),
    Mutant("skew-unadjusted", "tasks/data/statistics.py",
           "n * np.sqrt(n - 1) / (n - 2) * m3 / m2 ** 1.5", "n * np.sqrt(n) * m3 / m2 ** 1.5",
           (STATS,), "the biased skewness: log1p chosen on other columns than pandas'"),
    Mutant("fold-fits-its-own-rows", "tasks/data/foldmaps.py", "take[k, k] = False",
           "take[k, k] = True", (STATS,),
           "a fold's preprocessor sees its validation rows (leaky, as one fit on all rows)"),
    Mutant("fold-without-test-rows", "tasks/data/foldmaps.py", "take[:, F] = True",
           "take[:, F] = False", (STATS,),
           "fit_on = train+test: the fold preprocessors leave the test rows out"),
    Mutant("base-block-offset", "tasks/data/foldmaps.py",
           "offset=self.offset + lo * self.shape[1] * 4)",
           "offset=self.offset + lo * self.shape[1])",
           ("tests/tasks/test_tensorize.py::test_batches_of_rows_write_what_one_batch_writes",),
           "tensorize's later blocks of rows land at the wrong place in the fold base"),
    Mutant("unseen-as-missing", "tasks/data/features.py", "code[unseen] = len(cats) + 1",
           "code[unseen] = len(cats)", (PRE,),
           "an unseen category lights the missing-value column"),
    # engine: the stacked training loop equals torch's own
    Mutant("adam-no-bias-correction", "tasks/kinds/engine.py",
           "bc1, bc2_sqrt = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)",
           "bc1, bc2_sqrt = 1.0, 1.0", (ENGINE,), "Adam without bias correction"),
    Mutant("no-weight-decay", "tasks/kinds/engine.py",
           "return torch._foreach_add(grads, self.params, alpha=wd) if wd else grads",
           "return grads", (ENGINE,), "weight decay silently dropped"),
    Mutant("tanh-grad", "tasks/kinds/engine.py",
           'return 1 - a * a if name == "tanh" else a * (1 - a)',
           'return 1 - a if name == "tanh" else a * (1 - a)', (ENGINE,),
           "the written-out backward pass of tanh is wrong"),
    # score: the drift event
    Mutant("drift-every-time", "tasks/score.py",
           'if fresh and drift["share_drifted"] > threshold:',
           'if drift["share_drifted"] > threshold:', ("tests/flows/test_score.py",),
           "the drift event is raised again on every rescoring"),
]


def run_tests(tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    """``passed``, ``failed``, ``error`` (collection, usage) or ``timeout``, and seconds."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": tempfile.mkdtemp(prefix="mutant-pyc-")}
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p",
             "no:cacheprovider", "--no-cov", *tests], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start
    status = {0: "passed", 1: "failed"}.get(proc.returncode, "error")
    return status, time.monotonic() - start


def check(mutant: Mutant, timeout: float) -> tuple[str, float]:
    path = REPO / mutant.file
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return f"not planted ({original.count(mutant.old)} matches)", 0.0
    try:
        path.write_text(original.replace(mutant.old, mutant.new))
        status, seconds = run_tests(mutant.tests, timeout)
    finally:
        path.write_text(original)
    return {"failed": "caught", "timeout": "caught (timeout)", "passed": "SURVIVED",
            "error": "caught (error)"}[status], seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to check (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:30} {m.file:20} {m.why}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        print(f"unknown mutant(s) {unknown}; see --list", file=sys.stderr)
        return 2
    chosen = [by_name[n] for n in args.names] or MUTANTS
    baseline: dict[tuple[str, ...], str] = {}
    rows = []
    for m in chosen:
        if m.tests not in baseline:
            baseline[m.tests], _ = run_tests(m.tests, args.timeout)
        if baseline[m.tests] != "passed":
            result, seconds = f"not checked: baseline {baseline[m.tests]}", 0.0
        else:
            result, seconds = check(m, args.timeout)
        rows.append((m, result, seconds))
        print(f"{m.name:30} {result:18} {seconds:6.1f} s  {m.why}", flush=True)
    print("\n| mutant | file | planted bug | result | tests run | s |\n|---|---|---|---|---|---|")
    for m, result, seconds in rows:
        tests = ", ".join(t.split("::")[-1] if "::" in t else Path(t).name for t in m.tests)
        if len(tests) > 60:
            tests = f"{len(m.tests)} tests of {Path(m.tests[0].split('::')[0]).name}"
        print(f"| {m.name} | {m.file} | {m.why} | {result} | {tests} | {seconds:.0f} |")
    survived = [m.name for m, r, _ in rows if not r.startswith("caught")]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} caught"
          + (f"; not caught: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
