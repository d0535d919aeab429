"""The ``houseprice`` command as a user runs it: a real process, real exit codes and stderr."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.config import PROJECT_ROOT
from tasks.storage.artifacts import resolve
from tests.conftest import TEST_CSV, gpu_env, refused_port, without_ranges, write_config


def houseprice(*args, env_extra=None, api=None, base_env=None):
    env = {**(base_env or os.environ), **(env_extra or {})}
    if api:
        env["PREFECT_API_URL"] = api
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_invalid_config_is_rejected_before_running(tmp_path):
    proc = houseprice("run", "--folds", "1", "--artifacts", str(tmp_path / "a"))
    assert proc.returncode == 2
    assert last_line(proc.stderr).startswith("houseprice: error: invalid configuration: "
                                             "train.n_splits")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(("body", "words"), [
    ("[train]\nn_split = 3\n", ["train.n_split: no such setting", "did you mean 'n_splits'"]),
    ("[trian]\nseed = 1\n", ["trian: no such setting", "did you mean 'train'"]),
    ("[preprocess]\nper_folds = false\n", ["did you mean 'per_fold'"]),
])
def test_a_misspelt_setting_names_the_file_and_the_nearest_setting(tmp_path, body, words):
    (tmp_path / "c.toml").write_text(body)
    proc = houseprice("run", "--config", str(tmp_path / "c.toml"), "--artifacts",
                      str(tmp_path / "a"))
    line = last_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-500:]
    assert line.startswith(f"houseprice: error: invalid configuration in {tmp_path / 'c.toml'}")
    assert all(w in line for w in words), line
    assert "Extra inputs" not in line and not (tmp_path / "a").exists()


def test_device_cuda_without_cuda_fails_before_running(tmp_path):
    # the suite hides any GPU (tests/conftest.py): a machine without CUDA, on every machine
    proc = houseprice("run", "--device", "cuda", "--artifacts", str(tmp_path / "a"))
    assert proc.returncode == 1
    assert "device 'cuda' requested but CUDA is not available" in last_line(proc.stderr)
    assert not (tmp_path / "a").exists()


def test_bad_config_file_value_names_the_field(tmp_path):
    (tmp_path / "c.toml").write_text(
        '[[candidates]]\nname = "m"\nkind = "mlp"\nactivation = "gelu"\n')
    proc = houseprice("run", "--config", str(tmp_path / "c.toml"))
    assert proc.returncode == 2
    assert "candidate 'm'.activation: " in last_line(proc.stderr)


@pytest.mark.parametrize(("body", "words"), [
    ('kind = "hgb"\nhidden = [8]\n', ["candidate 'boost'", "'hidden'", "kind hgb"]),
    ('kind = "hgb"\nlr = 0.1\n', ["candidate 'boost'", "'lr'", "'learning_rate'"]),
    ('hidden = [8]\n', ["candidate 'boost' has no kind"]),
])
def test_a_field_of_another_kind_exits_2_naming_candidate_field_and_kind(tmp_path, body, words):
    (tmp_path / "c.toml").write_text('[[candidates]]\nname = "boost"\n' + body)
    proc = houseprice("run", "--config", str(tmp_path / "c.toml"), "--artifacts",
                      str(tmp_path / "a"))
    assert proc.returncode == 2, proc.stderr
    line = last_line(proc.stderr)
    assert line.startswith(f"houseprice: error: invalid configuration in {tmp_path / 'c.toml'}: ")
    assert all(w in line for w in words), line
    assert not (tmp_path / "a").exists()


def test_hash_mismatch_fails_run_with_one_line_and_empty_cache(real_data, serve_dir, tmp_path):
    """Also: no PREFECT_API_URL, and a PREFECT_HOME whose parents do not exist yet (Prefect's
    ephemeral API would fail to start there without the CLI creating them)."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for f in real_data.glob("*.csv"):
        (mirror / f.name).write_bytes(f.read_bytes())
    train = mirror / "kaggle_house_pred_train.csv"
    train.write_bytes(train.read_bytes().replace(b"208500", b"208501", 1))
    server = serve_dir(mirror)
    cache = tmp_path / "cache"
    home = tmp_path / "no" / "such" / "prefect-home"
    proc = houseprice("run", "--data-url", server.url, "--data-dir", str(cache),
                      "--artifacts", str(tmp_path / "a"), env_extra={"PREFECT_HOME": str(home)})
    assert proc.returncode == 1
    line = last_line(proc.stderr)
    assert line.startswith("houseprice: error: stage 'download' failed: ")
    assert "kaggle_house_pred_train.csv" in line
    assert "expected 585e9cc93e70b39160e7921475f9bcd7d31219ce" in line
    assert not cache.exists() or not any(cache.glob("kaggle_house_pred_train.csv*"))
    assert not (tmp_path / "a" / "download").exists() or not any(
        p for p in (tmp_path / "a" / "download").iterdir() if not p.name.startswith("."))


def test_predict_command_writes_kaggle_submission(trained, real_data, tmp_path):
    cfg, result = trained
    out = tmp_path / "pred.csv"
    proc = houseprice("predict", str(real_data / "kaggle_house_pred_test.csv"),
                      "--out", str(out), "--artifacts", cfg.artifacts_dir)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1459 predictions" in proc.stdout
    expected = pd.read_csv(resolve(cfg.artifacts_dir, "predict").file("submission.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(out), expected, rtol=1e-5)


def test_predict_on_a_gpu_that_is_not_there_is_one_line(trained, real_data, tmp_path):
    proc = houseprice("predict", str(real_data / "kaggle_house_pred_test.csv"), "--out",
                      str(tmp_path / "p.csv"), "--device", "cuda", "--artifacts",
                      trained[0].artifacts_dir)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "houseprice: error: device 'cuda' requested but CUDA is not available here; use "
        "--device cpu"]
    assert list(tmp_path.iterdir()) == []
    gpu = gpu_env()
    if gpu:  # a GPU machine: it predicts there, as on the CPU
        for device in ("cuda", "cpu"):
            proc = houseprice("predict", str(real_data / "kaggle_house_pred_test.csv"),
                              "--out", str(tmp_path / f"{device}.csv"), "--device", device,
                              "--artifacts", trained[0].artifacts_dir, base_env=gpu)
            assert proc.returncode == 0, proc.stderr
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cuda.csv"),
                                      pd.read_csv(tmp_path / "cpu.csv"), rtol=1e-5)


def test_predict_to_standard_output_and_version(trained, real_data, tmp_path):
    import io

    cfg, _ = trained
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "predict",
         str(real_data / "kaggle_house_pred_test.csv"), "--out", "-",
         "--artifacts", cfg.artifacts_dir],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = pd.read_csv(io.StringIO(proc.stdout))  # nothing but the CSV on stdout
    expected = pd.read_csv(resolve(cfg.artifacts_dir, "predict").file("submission.csv"))
    pd.testing.assert_frame_equal(got, expected, rtol=1e-5)
    assert "wrote 1459 predictions to standard output" in proc.stderr
    assert '"rows": 1459' in proc.stderr  # the drift summary
    assert list(tmp_path.iterdir()) == []  # no file named '-' (or '-.drift.json')
    version = houseprice("--version")
    assert version.returncode == 0 and version.stdout.startswith("houseprice 0.")


def test_the_docs_predict_lines_run_as_written(trained, real_data, tmp_path):
    """Every ``houseprice`` line of the Batch predict page (docs/predict.md), run as written
    against this session's model: only the input files (made from the Kaggle test file), a
    written model version (this run's instead) and the artifact root are the test's own."""
    import re
    import shlex

    cfg, result = trained
    section = (PROJECT_ROOT / "docs" / "predict.md").read_text()
    start = section.index("```bash") + len("```bash")
    block = section[start:section.index("```", start)]
    lines = [line.split("#")[0].split("|")[0].strip() for line in block.splitlines()
             if line.startswith("houseprice ")]
    assert sum(line.startswith("houseprice predict") for line in lines) >= 4, lines
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv")
    for line in lines:
        args = shlex.split(line)[1:]
        args = [result["model_version"] if re.fullmatch(r"[0-9a-f]{16}", a) else a
                for a in args]
        if args[0] == "predict":
            source = tmp_path / args[1]
            raw.to_parquet(source) if source.suffix == ".parquet" else raw.to_csv(
                source, index=False)
            args += ["--artifacts", cfg.artifacts_dir]
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (line, proc.stderr[-1000:])
        out = tmp_path / args[args.index("--out") + 1] if "--out" in args else None
        if out is not None and out.name != "-":
            read = pd.read_parquet if out.suffix == ".parquet" else pd.read_csv
            assert len(read(out)) == 1459


def test_predict_with_explicit_and_unknown_model_version(trained, real_data, tmp_path):
    cfg, result = trained
    test_csv = str(real_data / "kaggle_house_pred_test.csv")
    ok = houseprice("predict", test_csv, "--out", str(tmp_path / "p.csv"),
                    "--model", result["model_version"][:6], "--artifacts", cfg.artifacts_dir)
    assert ok.returncode == 0, ok.stderr  # a unique prefix is enough, as with git
    assert f"model {result['model_version']}" in ok.stdout
    bad = houseprice("predict", test_csv, "--out", str(tmp_path / "q.csv"),
                     "--model", "0123456789abcdef", "--artifacts", cfg.artifacts_dir)
    assert bad.returncode == 1
    line = last_line(bad.stderr)
    assert "no select version '0123456789abcdef' under" in line
    assert f"nearest: {result['model_version']}" in line and "houseprice models" in line
    assert not (tmp_path / "q.csv").exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_predict_with_an_interval_adds_calibrated_ranges(trained, real_data, tmp_path, suffix):
    cfg, _ = trained
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv")
    src = tmp_path / f"in{suffix}"
    raw.to_csv(src, index=False) if suffix == ".csv" else raw.to_parquet(src)
    outs = {}
    for level in ("0.8", "0.95"):
        out = outs[level] = tmp_path / f"ranges-{level}{suffix}"
        proc = houseprice("predict", str(src), "--out", str(out), "--interval", level,
                          "--artifacts", cfg.artifacts_dir)
        assert proc.returncode == 0, proc.stderr
        assert f"; {float(level):.0%} ranges)" in proc.stdout
    read = pd.read_csv if suffix == ".csv" else pd.read_parquet
    narrow, wide = read(outs["0.8"]), read(outs["0.95"])
    assert list(wide.columns) == ["Id", "SalePrice", "SalePrice_lo", "SalePrice_hi"]
    # The prices are the submission's; each range holds its price, and a higher level is
    # wider for every house.
    submission = pd.read_csv(resolve(cfg.artifacts_dir, "predict").file("submission.csv"))
    np.testing.assert_allclose(wide["SalePrice"], submission["SalePrice"], rtol=1e-5)
    assert (wide["SalePrice_lo"] < wide["SalePrice"]).all()
    assert (wide["SalePrice"] < wide["SalePrice_hi"]).all()
    assert (wide["SalePrice_hi"] - wide["SalePrice_lo"]
            > narrow["SalePrice_hi"] - narrow["SalePrice_lo"]).all()


def test_predict_with_a_level_outside_zero_and_one_is_one_line(trained, real_data, tmp_path):
    cfg, _ = trained
    test_csv = str(real_data / "kaggle_house_pred_test.csv")
    for level in ("0", "1", "1.5", "-0.1"):
        proc = houseprice("predict", test_csv, "--out", str(tmp_path / "p.csv"),
                          "--interval", level, "--artifacts", cfg.artifacts_dir)
        assert proc.returncode == 2, proc.stderr
        assert last_line(proc.stderr) == (
            f"houseprice: error: --interval {float(level)}: a coverage level is between 0 and "
            "1 (exclusive), such as 0.9 for 90% ranges")
    # A level the calibration's price bands cannot serve says the highest one they can.
    proc = houseprice("predict", test_csv, "--out", str(tmp_path / "p.csv"),
                      "--interval", "0.9999", "--artifacts", cfg.artifacts_dir)
    assert proc.returncode == 1
    assert re.search(r"error: --interval 0.9999: .* levels up to 0\.9\d+; pick a lower one$",
                     last_line(proc.stderr)), proc.stderr
    assert not (tmp_path / "p.csv").exists()


def test_predict_ranges_with_a_model_from_before_them_is_one_line(trained, real_data,
                                                                  tmp_path):
    cfg, result = trained
    root = tmp_path / "artifacts"
    shutil.copytree(cfg.artifacts_dir, root, symlinks=True)
    without_ranges(root, result["model_version"])
    proc = houseprice("predict", str(real_data / "kaggle_house_pred_test.csv"), "--out",
                      str(tmp_path / "p.csv"), "--interval", "0.9", "--artifacts", str(root))
    assert proc.returncode == 1
    assert last_line(proc.stderr) == (
        f"houseprice: error: model {result['model_version']} has no calibrated ranges (it "
        "predates them): rebuild it with 'houseprice run --from select', or predict without "
        "--interval")
    assert not (tmp_path / "p.csv").exists()


def test_predict_missing_column_is_one_clear_line(trained, real_data, tmp_path):
    cfg, _ = trained
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv")
    raw.drop(columns=["GrLivArea"]).to_csv(tmp_path / "in.csv", index=False)
    proc = houseprice("predict", str(tmp_path / "in.csv"), "--out", str(tmp_path / "o.csv"),
                      "--artifacts", cfg.artifacts_dir)
    assert proc.returncode == 1
    assert last_line(proc.stderr) == (
        f"houseprice: error: {tmp_path / 'in.csv'} lacks 1 column(s): GrLivArea; it must have "
        "the Kaggle test file's columns"
    )
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize(("args", "words"), [
    (["predict", "nowhere.csv", "--out", "x.csv"], "no production model under"),
    (["predict", "nowhere.csv", "--out", "x.csv", "--model", "latest"],
     "run 'houseprice run' first"),
    (["rollback"], "nothing to roll back"),
    (["promote", "f6b3c2ad"], "no intact model f6b3c2ad"),
])
def test_model_commands_without_any_run_say_what_to_do(args, words, tmp_path):
    proc = houseprice(*args, "--artifacts", str(tmp_path / "empty"))
    assert proc.returncode == 1
    assert words in last_line(proc.stderr) and "run" in last_line(proc.stderr)


def test_models_lists_versions_with_production_marked(trained, tmp_path):
    cfg, result = trained
    proc = houseprice("models", "--artifacts", cfg.artifacts_dir)
    assert proc.returncode == 0, proc.stderr
    (row,) = [line for line in proc.stdout.splitlines() if result["model_version"] in line]
    assert row.startswith("*") and f"{result['oof_log_rmse_all']:.4f}" in row


def test_make_feed_writes_monthly_files(real_data, tmp_path):
    proc = houseprice("make-feed", str(tmp_path / "feed"), "--until", "2006-03",
                      "--data-url", str(real_data), "--data-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "feed").iterdir()) == [
        "2006-01.csv", "2006-02.csv", "2006-03.csv"]
    assert "3 monthly file(s) 2006-01 .. 2006-03 (44 rows)" in proc.stdout


def test_run_command_end_to_end_with_env_settings(prefect_api, data_server, tmp_path):
    env = {"HOUSEPRICE_DATA_URL": data_server.url,
           "HOUSEPRICE_ARTIFACTS": str(tmp_path / "arts"),
           "HOUSEPRICE_DATA_DIR": str(tmp_path / "cache")}
    sub = tmp_path / "sub" / "submission.csv"
    proc = houseprice("run", "--config", str(write_config(tmp_path / "c.json")),
                      "--epochs", "3", "--folds", "3", "--repeats", "2", "--seed", "1",
                      "--submission", str(sub), env_extra=env, api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = last_line(proc.stdout)
    assert summary.startswith("houseprice: selected ")
    assert "2 x 3-fold out-of-fold log RMSE" in summary and "over repeats on all rows" in summary
    assert "houseprice: training" not in proc.stderr + proc.stdout  # not a terminal: no progress
    # The result table before it: every candidate with its scores, the selection, the paths.
    import re

    version = re.search(r"model ([0-9a-f]{16})", summary)[1]
    table = proc.stdout[proc.stdout.index("out-of-fold log RMSE, best first"):]
    rows = {line.split()[0]: line.split() for line in
            (raw.replace(" *", "") for raw in table.splitlines()[2:])
            if line.startswith("  ") and len(line.split()) >= 5}
    for name in ("linear", "mlp", "lasso", "hgb", "ridge-00", "ridge-01"):
        assert name in rows, (name, table)
        assert re.fullmatch(r"0\.\d{4}", rows[name][1]), rows[name]  # its all-rows score
    selected = summary.split()[2]
    assert f"{selected} *" in table and "selected" in table
    assert f"model        {version}" in table and "submission   " in table
    assert f"copied to    {sub}" in table and str(tmp_path / "arts") in table
    assert len(pd.read_csv(sub)) == 1459
    assert (tmp_path / "cache" / "kaggle_house_pred_test.csv").is_file()
    assert resolve(tmp_path / "arts", "select").file("model.pt").is_file()
    # The final form and its speed; Prefect's own log lines in a file, not on the terminal.
    assert re.search(r"final form   (ensemble|mixed|refit) .*predicts [\d,]+ rows/s", table)
    log = Path(re.search(r"  log          (\S+)", table)[1])
    assert log.parent == tmp_path / "arts" / "logs" and "Prefect's log: " in proc.stdout
    assert "Task run 'select' - Finished in state Completed()" in log.read_text()
    assert "Finished in state" not in proc.stdout + proc.stderr
    # --from predict: the stages before it Cached, predict run again in place.
    again = houseprice("run", "--config", str(tmp_path / "c.json"), "--epochs", "3", "--folds",
                       "3", "--repeats", "2", "--seed", "1", "--submission", str(sub),
                       "--from", "predict", env_extra=env, api=prefect_api)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"model {version}" in last_line(again.stdout)
    text = Path(re.search(r"  log          (\S+)", again.stdout)[1]).read_text()
    assert "Task run 'predict' - Finished in state Completed()" in text
    assert "Task run 'select' - Finished in state Cached" in text
    bad = houseprice("run", "--from", "nowhere", api=prefect_api)
    assert bad.returncode == 2 and "invalid choice: 'nowhere'" in bad.stderr


@pytest.mark.parametrize("level", ["0", "1.5"])
def test_score_with_a_level_outside_zero_and_one_is_one_line(level, tmp_path):
    proc = houseprice("score", str(tmp_path), "--interval", level,
                      "--artifacts", str(tmp_path / "a"))
    assert proc.returncode == 2
    assert re.fullmatch(r"houseprice: error: invalid configuration: interval: Input should be "
                        r"(greater|less) than [01]; fix it in --config or the flags",
                        last_line(proc.stderr)), proc.stderr
    assert not (tmp_path / "a").exists()


def test_score_scores_an_inbox_once_and_names_a_file_it_cannot_score(trained, tmp_path):
    cfg, result = trained
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    listings = pd.read_csv(TEST_CSV)
    listings.head(50).to_csv(inbox / "ok.csv", index=False)
    far = listings.iloc[50:80].copy()
    far["GrLivArea"] *= 10
    far.to_csv(inbox / "far.csv", index=False)
    args = ("score", str(inbox), "--artifacts", cfg.artifacts_dir, "--model",
            result["model_version"], "--drift-threshold", "0.3")
    proc = houseprice(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = last_line(proc.stdout)
    assert line.startswith(f"houseprice: scored 2 file(s) with model {result['model_version']}"
                           "; drift over the threshold in far.csv; predictions: "), line
    paths = [Path(p) for p in line.split("predictions: ")[1].split(", ")]
    rows = {len(pd.read_csv(p)) for p in paths}
    # With the 90% range of each price, the scoring flow's default.
    assert rows == {50, 30} and all(
        list(pd.read_csv(p).columns) == ["Id", "SalePrice", "SalePrice_lo", "SalePrice_hi"]
        for p in paths)
    (inbox / "broken.csv").write_text("Id,MSSubClass\n1")
    proc = houseprice(*args)
    assert proc.returncode == 1
    assert "broken.csv" in last_line(proc.stderr) and "1 of 3 inbox file(s)" in last_line(
        proc.stderr), proc.stderr[-1000:]


def test_verbose_keeps_prefects_log_on_the_terminal(prefect_api, data_server, tmp_path):
    env = {"HOUSEPRICE_DATA_URL": data_server.url,
           "HOUSEPRICE_DATA_DIR": str(tmp_path / "cache")}
    config = write_config(tmp_path / "c.json", candidates=[
        {"name": "lasso", "kind": "lasso", "alpha": 5e-4}], search=[])
    proc = houseprice("run", "--config", str(config), "--artifacts", str(tmp_path / "arts"),
                      "--folds", "3", "--verbose", env_extra=env, api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Finished in state Completed()" in proc.stdout + proc.stderr
    assert not (tmp_path / "arts" / "logs").exists()


def test_unreachable_prefect_server_is_one_clear_line(tmp_path):
    with refused_port() as port:
        url = f"http://127.0.0.1:{port}/api"
        proc = houseprice("run", "--artifacts", str(tmp_path / "a"), api=url)
    assert proc.returncode == 1
    line = last_line(proc.stderr)
    assert line.startswith(f"houseprice: error: cannot reach the Prefect API at {url}")
    # The hint's command works as written (the venv's prefect, not one assumed on PATH).
    import re
    import shutil

    command = re.search(r"start it with '([^']+) server start'", line)[1]
    assert Path(command).is_file() or shutil.which(command), command


def test_malformed_config_file_and_bad_run_id_are_named_before_anything_else(tmp_path):
    broken = tmp_path / "my.toml"
    broken.write_text("[train\nn_splits = 3\n")
    proc = houseprice("run", "--config", str(broken), "--artifacts", str(tmp_path / "a"))
    assert proc.returncode == 2
    assert last_line(proc.stderr) == (
        f"houseprice: error: config file {broken} is not valid TOML: Expected ']' at the end "
        "of a table declaration (at line 1, column 7); fix that line")
    # --traceback is global: after the subcommand too, it shows the trace
    traced = houseprice("run", "--config", str(broken), "--traceback")
    assert traced.returncode == 2 and "Traceback (most recent call last)" in traced.stderr
    # rerun: the id is checked before any server is looked for (none is set here)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "rerun", "not-a-uuid"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert last_line(proc.stderr) == ("houseprice: error: 'not-a-uuid' is not a flow run id "
                                      "(a UUID, as shown in the dashboard)")


def test_temporary_api_that_cannot_start_is_one_clear_line(tmp_path):
    """Without PREFECT_API_URL the run starts its own temporary API first; one that exits
    before answering is started again on another port, then reported in one line."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_DATABASE_CONNECTION_URL=(
        f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/prefect.db"))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--artifacts",
                           str(tmp_path / "a")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 1
    line = last_line(proc.stderr)
    import re
    import shutil

    match = re.fullmatch(r"houseprice: error: the temporary Prefect API server exited with "
                         r"code 3 before answering, 3 times; run '(\S*prefect) server start' "
                         r"to see why", line)
    assert match, line
    assert Path(match[1]).is_file() or shutil.which(match[1])  # a command that works here
    assert not (tmp_path / "a").exists()  # nothing ran


def test_book_config_reproduces_the_books_recipe(prefect_api, data_server, tmp_path):
    import json


    arts = tmp_path / "arts"
    proc = houseprice("run", "--config", str(PROJECT_ROOT / "configs" / "book.toml"),
                      "--epochs", "3", "--data-url", data_server.url,
                      "--data-dir", str(tmp_path / "cache"), "--artifacts", str(arts),
                      api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "selected book-linear" in last_line(proc.stdout)
    (pre,) = [p for p in (arts / "preprocess").iterdir() if p.is_dir()]
    manifest = json.loads((pre / "manifest.json").read_text())
    assert manifest["parameters"]["config"] == {
        "fit_on": "train+test", "log1p_skewed": False, "derived": False, "ordinal": False,
        "as_category": [], "interactions": [], "skew_threshold": 0.75}
    stats = json.loads((pre / "preprocessor.json").read_text())["numeric"]["LotArea"]
    both = pd.concat([pd.read_csv(data_server.url + name)["LotArea"]
                      for name in ("kaggle_house_pred_train.csv", "kaggle_house_pred_test.csv")])
    assert stats["mean"] == pytest.approx(both.mean())  # statistics over train+test
    (sel,) = [p for p in (arts / "select").iterdir() if p.is_dir()]
    card = (sel / "model_card.md").read_text()
    assert "| fold_scheme | contiguous |" in card and "| target | raw |" in card


def test_two_runs_at_once_on_one_root_both_succeed_consistently(prefect_api, data_server,
                                                                 tmp_path):
    """Two schedules firing together: same config, same artifact root and cache."""
    config = write_config(tmp_path / "c.json")
    arts = tmp_path / "arts"
    args = ["run", "--config", str(config), "--epochs", "3", "--folds", "3",
            "--data-url", data_server.url, "--data-dir", str(tmp_path / "cache"),
            "--artifacts", str(arts)]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    versions = [last_line(out).split("model ")[1].split(")")[0] for out, _ in outs]
    assert versions[0] == versions[1]  # the same model version, built once or twice
    for stage in ("download", "preprocess", "tensorize", "select", "predict"):
        built = [d for d in (arts / stage).iterdir() if d.is_dir()]
        assert len(built) == 1, (stage, built)  # one version each, no leftovers
        assert not [d for d in (arts / stage).iterdir() if d.name.startswith(".")]
        resolve(arts, stage, built[0].name)  # intact: every file matches its manifest


def test_temporary_server_skips_block_registration_only_once_done(tmp_path, monkeypatch):
    from flows.commands.server import skip_block_registration

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_MEMO_STORE_PATH", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_REGISTER_BLOCKS_ON_START", raising=False)
    assert skip_block_registration() == {}  # a new Prefect home registers them
    (tmp_path / "memo_store.toml").write_text('block_auto_registration = "ab12"\n')
    assert skip_block_registration()["PREFECT_SERVER_REGISTER_BLOCKS_ON_START"] == "false"
    monkeypatch.setenv("PREFECT_SERVER_REGISTER_BLOCKS_ON_START", "true")  # the user's choice
    assert skip_block_registration() == {}


def test_a_killed_run_leaves_no_temporary_server(tmp_path):
    import signal
    import time

    script = ("import os, time\nfrom flows.commands.server import start_ephemeral_api\n"
              "start_ephemeral_api()()\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert int(proc.stdout.readline()) == proc.pid  # its server answers
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert children, "the temporary server is not a child of the run"
        proc.send_signal(signal.SIGKILL)  # no atexit, no cleanup of its own
        proc.wait()
        def alive(pid: str) -> bool:  # running, not a zombie waiting to be reaped
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return False
            return stat.split(")")[-1].split()[0] != "Z"

        deadline = time.monotonic() + 15
        while any(alive(c) for c in children):
            assert time.monotonic() < deadline, "the server outlived its killed run"
            time.sleep(0.1)
    finally:
        proc.kill()


def test_terminal_progress_line_lists_what_is_training():
    import io
    import time

    from flows.commands.run import TerminalProgress
    from tasks.progress import muted, report, report_score

    out = io.StringIO()
    display = TerminalProgress(total=7, every=0.05, out=out).start()
    try:
        assert display.line() is None  # nothing training yet: nothing printed
        report("lasso", 1.0)
        for i in range(6):
            report(f"mlp-{i:02d}", 0.4)
        report_score("mlp-01", 0.1234)
        with muted():  # a refit's scores (on its own training rows) are not shown
            report_score("mlp-02", 0.01)
        display.stage("select", "Running")
        time.sleep(0.3)
        running = display.block()[0]
        display.stage("select", "Completed")
        block = display.block()
    finally:
        display.stop()
    # One row per candidate in training: percent, time so far, latest valid score.
    row = next(line for line in block if line.strip().startswith("mlp-01"))
    assert " 40%" in row and row.rstrip().endswith("valid 0.1234")
    assert not any("0.0100" in line for line in block) and len(block) == 1 + 6
    import re

    assert re.search("\x1b\\[\\d+F\x1b\\[J", out.getvalue())  # redrawn in place
    assert running.startswith("houseprice: select running 0:00")  # a stage under way
    assert "houseprice: select · Completed in 0." in out.getvalue()
    report("late", 0.5)  # after stop: no hook, nothing recorded
    line = display.line()
    assert "1 of 7 candidates trained" in line and "mlp-00 40%" in line and "(+2 more)" in line
    assert "late" not in line
    assert out.getvalue().count("houseprice: training") >= 2


@pytest.mark.serial
def test_run_on_a_terminal_shows_progress_at_least_every_5_s(prefect_api, data_server,
                                                               tmp_path):
    """In a pseudo-terminal, ``houseprice run`` prints a progress line while candidates
    train (every 2 s) and a line as each stage ends; the same run in a pipe prints none
    (see the end-to-end test)."""
    import pty
    import re
    import select
    import time

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "HOUSEPRICE_DATA_URL": data_server.url,
           "HOUSEPRICE_ARTIFACTS": str(tmp_path / "arts"),
           "HOUSEPRICE_DATA_DIR": str(tmp_path / "cache")}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config",
         # enough epochs that the torch candidates are still training at a redraw (every
         # 2 s) on a fast machine: at 40 they once finished between two
         str(write_config(tmp_path / "c.json")), "--epochs", "80"],
        stdin=slave, stdout=slave, stderr=slave, env=env, cwd=PROJECT_ROOT, close_fds=True)
    os.close(slave)
    text, stamps, pending = b"", [], b""
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            text += data
            pending += data
            *lines, pending = pending.split(b"\n")
            stamps += [time.monotonic() for line in lines if b"houseprice: training" in line]
    finally:
        os.close(master)
        proc.wait(timeout=60)
    output = text.decode(errors="replace")
    assert proc.returncode == 0, output[-2000:]
    assert len(stamps) >= 2, output[-3000:]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) <= 5.0, gaps
    assert "candidates trained" in output and "houseprice: selected" in output
    # A row per candidate in training with its percent, time and latest valid log RMSE.
    assert re.search(r"  \S+ +\d+%  \d+:\d\d  valid 0\.\d{4}", output), output[-3000:]
    # Each stage's line as it ends, in order; Prefect's own lines are in the log file.
    for stage in ("download", "preprocess", "tensorize", "train", "select", "predict"):
        assert re.search(rf"houseprice: {stage} · (Completed in [\d.]+ s|Cached)", output), stage
    assert (output.index("houseprice: tensorize ·") < output.index("houseprice: train ·")
            < output.index("houseprice: select ·"))
    assert "Finished in state" not in output


def test_help_says_what_the_defaults_are_and_accepts_every_final_form(capsys):
    """--final names 'auto' as its default and takes every form select has; the top-level
    description is whole sentences."""
    import argparse

    from flows.cli import _parser
    from flows.commands.config import build_config

    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    top = capsys.readouterr().out
    assert "check the artifact store" in top and "stop the local Prefect API that runs keep." \
        in " ".join(top.split())
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"])
    final = " ".join(capsys.readouterr().out.rsplit("--final {auto,ensemble,mixed,refit}", 1)[1]
                     .split("--min-rows-per-s")[0].split())
    assert "'auto' (the default)" in final and "(default)" not in final.replace(
        "(the default)", "")
    for form in ("auto", "ensemble", "mixed", "refit"):
        args = parser.parse_args(["run", "--final", form])
        assert isinstance(args, argparse.Namespace)
        assert build_config(args).select.final == form


@pytest.mark.serial
def test_ctrl_c_says_at_once_which_run_and_how_to_resume_and_stops_in_seconds(
        data_server, tmp_path):
    """SIGINT while candidates train: a line naming the flow run and how to resume comes at
    once, training stops at its next epoch or fold, and the command exits 130 with that
    line last; rerunning the same command resumes with the finished stages Cached."""
    import re
    import signal
    import threading
    import time

    config = write_config(tmp_path / "c.json")
    args = [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--epochs",
            "3000", "--artifacts", str(tmp_path / "a"), "--data-url", data_server.url,
            "--data-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = Path(proc.stdout.readline().rsplit("Prefect's log: ", 1)[1].strip())
    deadline = time.monotonic() + 120
    while "Task run 'tensorize' - Finished" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    time.sleep(3)  # candidates under way
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend(
        (time.monotonic(), line.strip()) for line in proc.stderr))
    reader.start()
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    took = time.monotonic() - sent
    said = [(t - sent, text) for t, text in lines if text.startswith("houseprice: interrupted")]
    assert proc.returncode == 130 and took < 20, (proc.returncode, took, lines)
    first_at, first = said[0]
    assert first_at < 2.0, said
    run_id = re.search(r"flow run ([0-9a-f-]{36})", first).group(1)
    assert f"resume it with 'houseprice run --config {config}'" in first
    assert lines[-1][1].startswith(f"houseprice: interrupted: flow run {run_id}; resume")
    assert "Traceback" not in "\n".join(text for _, text in lines)


def test_a_failed_run_is_one_line_naming_the_log_which_has_the_traces(real_data, tmp_path):
    """A cut-off training file: Prefect's traces of the failed task and flow runs go to
    the log file, the terminal gets the one-line error, which names the log."""
    cut = tmp_path / "train.csv"
    cut.write_bytes((real_data / "kaggle_house_pred_train.csv").read_bytes()[:200_000])
    proc = houseprice("run", "--data-url", str(real_data), "--train", str(cut),
                      "--artifacts", str(tmp_path / "a"), "--data-dir", str(tmp_path / "c"))
    assert proc.returncode == 1
    lines = [x for x in proc.stderr.splitlines() if x.strip()
             and "Warning" not in x and not x.startswith("  ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    log = proc.stdout.split("Prefect's log: ", 1)[1].split()[0]
    assert lines[0].startswith("houseprice: error: stage 'download' failed: train.csv line")
    assert lines[0].endswith(f"; trace in {log}")
    assert "Traceback" in Path(log).read_text()


def test_a_config_error_says_run_again_not_retry(prefect_server, data_server, tmp_path):
    """A retry replays the flow run's frozen parameters, so a config error would fail the
    same way: the hint is to fix the config and run it again."""
    config = write_config(tmp_path / "c.json", preprocess={"interactions": ["Nope@Street"]})
    proc = houseprice("run", "--config", str(config), "--artifacts", str(tmp_path / "a"),
                      "--data-url", data_server.url, "--data-dir", str(tmp_path / "c"),
                      api=prefect_server)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert "stage 'preprocess' failed" in line and "Nope" in line, line
    assert f"fix it, then run 'houseprice run --config {config}' again" in line
    assert "houseprice rerun" not in line
