"""Reading raw files as Arrow record batches: the streamed checks give the whole-frame
checks' errors, and the streamed fit learns what ``fit_preprocessor`` learns from the whole
frame, on the real rows and on rows made to catch a batch reader out (a column that turns
to text, or gets its first value, batches after the first; a category in one batch only;
constant columns; missing values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.config import PreprocessConfig
from tasks.data import rawcsv
from tasks.data.features import DataError, fit_preprocessor, read_csv

SMALL = 1 << 12  # bytes a batch: a few dozen rows, so small files span many batches


def streamed(train: Path, test: Path | None = None, config: PreprocessConfig | None = None,
             block: int = SMALL):
    codes = config.as_category if config else ()
    s = rawcsv.scan(train, "train.csv", codes=codes, block_bytes=block)
    files = [(train, s)]
    if test is not None:
        files.append((test, rawcsv.scan(test, "test.csv", training=False, codes=codes,
                                        types=rawcsv.scan_types(s, rawcsv.header(test, "t")),
                                        block_bytes=block)))
    return rawcsv.fit_streamed(files, config, block_bytes=block)


def assert_same_fit(a, b) -> None:
    da, db = a.to_dict(), b.to_dict()
    assert da["feature_names"] == db["feature_names"]
    assert da["categorical"] == db["categorical"]
    assert da["columns"] == db["columns"] and da["options"] == db["options"]
    assert da["numeric"].keys() == db["numeric"].keys()
    for col, stats in db["numeric"].items():
        for key, value in stats.items():
            assert da["numeric"][col][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (
                col, key)


@pytest.mark.parametrize("config", [None, PreprocessConfig()], ids=["book", "default"])
@pytest.mark.parametrize("both", [False, True], ids=["train", "train+test"])
def test_streamed_fit_equals_the_frame_fit_on_the_real_rows(real_data, config, both):
    train, test = (real_data / "kaggle_house_pred_train.csv",
                   real_data / "kaggle_house_pred_test.csv")
    pre = streamed(train, test if both else None, config)
    ref = fit_preprocessor(read_csv(train), read_csv(test) if both else None, config)
    assert_same_fit(pre, ref)
    assert len(pre.feature_names_) == len(ref.feature_names_) > 300
    # the streamed checks pass the real file, and count its rows
    assert rawcsv.scan(train, "train.csv", block_bytes=SMALL).n == 1460


def adversarial(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    late = np.full(n, np.nan)
    late[n // 2:] = rng.normal(50, 5, n - n // 2)  # first values far past the first batch
    mixed = rng.integers(1, 9, n).astype(object)
    mixed[n - 3] = "C (all)"  # numbers for hundreds of rows, then a category that is text
    mixed[[10, n - 100]] = "Other"  # (and a few more: under 90% numbers, a category column)
    mixed[rng.random(n) < 0.2] = "Grvl"
    rare = np.where(np.arange(n) == n - 1, "OnlyHere", "Common")
    return pd.DataFrame({
        "Id": np.arange(1, n + 1),
        "LotArea": rng.lognormal(9, 1, n).round(),
        "Late": late,
        "Const": 7.0,
        "ConstText": "Same",
        "Mixed": mixed,
        "Rare": rare,
        "WithHoles": np.where(rng.random(n) < 0.3, np.nan, rng.normal(0, 1, n)),
        "MSSubClass": rng.choice([20, 60, 190], n),
        "Neighborhood": rng.choice(["A", "B", "C"], n),
        "SalePrice": rng.lognormal(12, 0.3, n).round(),
    })


@pytest.mark.parametrize("config", [None, PreprocessConfig(
    derived=False, interactions=("LotArea@Neighborhood",))], ids=["book", "switches"])
def test_streamed_fit_equals_the_frame_fit_on_rows_that_change_late(tmp_path, config):
    frame = adversarial()
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    s = rawcsv.scan(path, "train.csv", codes=config.as_category if config else (),
                    block_bytes=SMALL)
    # the first batch read Late as empty and Mixed as numbers: both read again as text
    assert s.types["Mixed"] == rawcsv.TEXT and s.types["Late"] == rawcsv.TEXT
    assert "Late" in s.numeric and "Mixed" not in s.numeric  # all numbers / a category
    pre = streamed(path, config=config)
    ref = fit_preprocessor(read_csv(path), config=config)
    assert_same_fit(pre, ref)
    assert "OnlyHere" in pre.categories_["Rare"] and pre.numeric_["Const"] == (7.0, 1.0)
    assert pre.categories_["Mixed"] == ref.categories_["Mixed"] and "C (all)" in ref.categories_[
        "Mixed"]
    X, _ = pre.transform(frame)
    np.testing.assert_allclose(X, ref.transform(frame)[0], rtol=1e-6, atol=1e-6)


BASE = pd.DataFrame({"Id": range(1, 301), "Area": np.arange(300) * 1.5 + 100,
                     "Zone": ["RL", "RM", "FV"] * 100, "SalePrice": 1e5 + np.arange(300)})


def late(df: pd.DataFrame, col: str, value, at: int = 250) -> pd.DataFrame:
    """``df`` with ``value`` in ``col`` at data row ``at + 1``: batches after the first."""
    out = df.copy()
    out[col] = out[col].astype(object)
    out.loc[at, col] = value
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda df: df.drop(columns=["SalePrice"]), "lacks column.*SalePrice"),
        (lambda df: df.iloc[0:0], "no rows"),
        (lambda df: late(df, "SalePrice", -5.0), r"positive; bad rows Id=\[251\]"),
        # prices read as text (none in the first batches): the missing ones are bad rows
        (lambda df: late(df.assign(SalePrice=[None] * 200 + [1e5] * 100), "SalePrice", -5.0),
         r"positive; bad rows Id=\[1, 2, 3, 4, 5\]"),
        (lambda df: late(df, "Id", 7), r"duplicate Id values \[7\]"),
        (lambda df: late(df, "SalePrice", "x"), "SalePrice is not numeric.*Id=251"),
        (lambda df: df.drop(columns=["Zone"]), "lacks feature column.*Zone"),
        (lambda df: df.assign(Zone=None), "Zone have no values"),
        (lambda df: late(df, "Area", "ten"), r"column Area is numeric but has 'ten' at Id=251"),
        (lambda df: late(df, "Id", ""), "a row has no Id .*data row 251"),
        (lambda df: late(df, "Id", "S524"), "Id must be a whole number but is 'S524' at data "
                                            "row 251"),
        (lambda df: late(df, "Id", 7.5), "Id must be a whole number but is '7.5' at data row "
                                         "251"),
        (lambda df: late(df, "SalePrice", np.inf), r"column SalePrice has inf at Id=251"),
        (lambda df: late(df, "Area", 1e300), r"column Area has 1e\+300 at Id=251"),
        # a column empty in the first batch is read as text: checked as numbers the same
        (lambda df: late(df.assign(Late=[np.nan] * 200 + [1.0] * 100), "Late", 1e300, 260),
         r"column Late has 1e\+300 at Id=261"),
    ],
)
def test_streamed_checks_name_the_column_and_row(tmp_path, change, message):
    frame = change(BASE)
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    if "Late" in frame:
        assert rawcsv.guess_types(path, "t", SMALL)["Late"] == rawcsv.TEXT
    with pytest.raises(DataError, match=message):
        rawcsv.scan(path, "train.csv", expected=["Area", "Zone"], block_bytes=SMALL)


def test_prices_read_as_text_are_checked_as_numbers(tmp_path):
    path = tmp_path / "train.csv"
    late(BASE, "SalePrice", "-5").to_csv(path, index=False)
    types = {**rawcsv.guess_types(path, "t"), "SalePrice": rawcsv.TEXT}
    with pytest.raises(DataError, match=r"positive; bad rows Id=\[251\]"):
        rawcsv.scan(path, "train.csv", types=types, block_bytes=SMALL)


def test_ids_written_alike_are_one_id(tmp_path):
    frame = BASE.copy()
    frame["Id"] = frame["Id"].astype(str)
    frame.loc[260, "Id"] = "007.0"
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"duplicate Id values \[7\]"):
        rawcsv.scan(path, "train.csv", block_bytes=SMALL)


def test_a_file_that_is_not_csv_is_one_line(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.csv is empty"):
        rawcsv.scan(empty, "empty.csv")
    cut = tmp_path / "cut.csv"
    cut.write_text(BASE.to_csv(index=False) + "301,5\n")
    with pytest.raises(DataError, match=r"cut.csv is not a valid CSV file .*Expected 4 "
                                        "columns, got 2: 301,5"):
        rawcsv.scan(cut, "cut.csv", block_bytes=SMALL)
