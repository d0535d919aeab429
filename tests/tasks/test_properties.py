"""Property-based tests (Hypothesis, seeded and bounded) of what users hand in: the rows to
predict and the training file. Random column sets, orders and dtypes; missing, empty, inf,
huge and negative values; Id formats. Each example gives one clear error with nothing
written, or finite predictions equal to the reference path (the checkpoint, through
pandas) within 1e-6 relative."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.data import rawcsv
from tasks.data.features import DataError, fit_preprocessor
from tasks.inference.batch import load_model, predict_file
from tasks.inference.checkpoint import FittedModel
from tasks.storage.artifacts import resolve

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])
# Values a careless file holds, as text (CSV) or numbers (Parquet).
ODD_VALUES = ["", "NA", "inf", "-inf", "nan", "1e300", "-1e300", "1e39", "-5", "-5000", "0",
              "1e6", "3.5", "abc", " 7 "]
ID_FORMATS = [lambda i: str(i), lambda i: f"{i:06d}", lambda i: f"ID-{i}", lambda i: f" {i}",
              lambda i: "", lambda i: "1461"]


@pytest.fixture(scope="module")
def models(trained):
    cfg, _ = trained
    ref = resolve(cfg.artifacts_dir, "select")
    return load_model(ref), FittedModel.load(ref.file("model.pt"))


@pytest.fixture(scope="module")
def test_rows(real_data) -> pd.DataFrame:
    return pd.read_csv(real_data / "kaggle_house_pred_test.csv", dtype=str).head(8)


@st.composite
def predict_inputs(draw, rows: pd.DataFrame):
    frame = rows.head(draw(st.integers(1, len(rows)))).copy()
    columns = [c for c in frame.columns if c != "Id"]
    for _ in range(draw(st.integers(0, 4))):  # odd values in random cells
        col = draw(st.sampled_from(columns))
        frame.loc[frame.index[draw(st.integers(0, len(frame) - 1))], col] = draw(
            st.sampled_from(ODD_VALUES))
    if draw(st.booleans()):  # Id formats
        fmt = draw(st.sampled_from(ID_FORMATS))
        frame["Id"] = [fmt(1461 + i) if draw(st.booleans()) else str(1461 + i)
                       for i in range(len(frame))]
    dropped = draw(st.lists(st.sampled_from(frame.columns.tolist()), max_size=2, unique=True))
    frame = frame.drop(columns=dropped) if draw(st.integers(0, 4)) == 0 else frame
    order = draw(st.permutations(frame.columns.tolist()))
    return frame[list(order)], draw(st.sampled_from(["csv", "parquet"]))


def _write(frame: pd.DataFrame, path, fmt: str) -> None:
    if fmt == "csv":
        frame.to_csv(path, index=False)
        return
    # Parquet: numbers as numbers where a column is all numbers, else text (as a user's
    # tool would type them)
    typed = frame.copy()
    for col in typed.columns.drop("Id", errors="ignore"):
        parsed = pd.to_numeric(typed[col], errors="coerce")
        if parsed.notna().sum() == typed[col].replace("", np.nan).notna().sum():
            typed[col] = parsed
    typed.to_parquet(path)


def _outcome(model, path, out):
    try:
        predict_file(model, path, out, warn=lambda _: None)
    except DataError as exc:
        return exc
    return pd.read_csv(out, dtype={"Id": str}) if out.suffix == ".csv" else pd.read_parquet(out)


def test_predict_reader_errors_cleanly_or_matches_the_reference(models, test_rows,
                                                                 tmp_path_factory):
    plan, reference = models

    @SETTINGS
    @given(predict_inputs(test_rows))
    def check(example):
        frame, fmt = example
        folder = tmp_path_factory.mktemp("ex")
        path = folder / f"in.{fmt}"
        _write(frame, path, fmt)
        got = _outcome(plan, path, folder / "plan.csv")
        want = _outcome(reference, path, folder / "ref.csv")
        if isinstance(got, Exception):
            message = str(got)
            assert "\n" not in message and str(path) in message or "lacks" in message, message
            assert isinstance(want, Exception), (message, want)
            assert sorted(p.name for p in folder.iterdir()) == [path.name]  # nothing written
            return
        assert not isinstance(want, Exception), want
        prices = got["SalePrice"].to_numpy()
        assert np.isfinite(prices).all() and (prices > 0).all()
        assert got["Id"].astype(str).tolist() == frame["Id"].astype(str).tolist()
        np.testing.assert_allclose(prices, want["SalePrice"].to_numpy(), rtol=1e-6)

    check()


@st.composite
def training_frames(draw, rows: pd.DataFrame):
    frame = rows.copy()
    columns = [c for c in frame.columns if c != "Id"]
    for _ in range(draw(st.integers(0, 4))):
        col = draw(st.sampled_from(columns))
        frame.loc[frame.index[draw(st.integers(0, len(frame) - 1))], col] = draw(
            st.sampled_from(ODD_VALUES))
    if draw(st.booleans()):
        fmt = draw(st.sampled_from(ID_FORMATS))
        frame["Id"] = [fmt(i + 1) if draw(st.booleans()) else str(i + 1)
                       for i in range(len(frame))]
    if draw(st.integers(0, 4)) == 0:
        frame = frame.drop(columns=draw(st.lists(st.sampled_from(frame.columns.tolist()),
                                                 min_size=1, max_size=2, unique=True)))
    return frame[list(draw(st.permutations(frame.columns.tolist())))]


def test_training_validation_errors_cleanly_or_gives_finite_features(real_data, test_rows,
                                                                      tmp_path_factory):
    train = pd.read_csv(real_data / "kaggle_house_pred_train.csv", dtype=str).head(40)
    expected = [c for c in test_rows.columns if c != "Id"]

    @SETTINGS
    @given(training_frames(train))
    def check(frame):
        path = tmp_path_factory.mktemp("train") / "train.csv"
        frame.to_csv(path, index=False)
        try:  # as preprocess reads it: batches of a few rows
            scan = rawcsv.scan(path, "train.csv", expected=expected, block_bytes=1 << 12)
        except DataError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("train.csv"), exc
            return
        ids = scan.all_ids()
        assert ids.dtype == np.int64 and len(np.unique(ids)) == len(frame) == scan.n
        pre = rawcsv.fit_streamed([(path, scan)], block_bytes=1 << 12)
        X, _ = pre.transform(pd.read_csv(path, dtype=pre.raw_dtypes()))
        assert np.isfinite(X).all()
        df = pd.read_csv(path)  # the whole frame's fit learns the same
        np.testing.assert_allclose(X, fit_preprocessor(df).transform(df)[0], atol=1e-5)

    check()
