from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.data.features import (
    DataError,
    Preprocessor,
    fit_preprocessor,
    read_csv,
)


@pytest.fixture
def frames():
    train = pd.DataFrame({
        "Id": [1, 2, 3, 4],
        "Area": [100.0, 200.0, np.nan, 300.0],
        "Zone": pd.array(["RL", "RM", None, "RL"], dtype="str"),
        "SalePrice": [1e5, 2e5, 1.5e5, 3e5],
    })
    test = pd.DataFrame({
        "Id": [5, 6],
        "Area": [1000.0, 150.0],
        "Zone": pd.array(["FV", "RM"], dtype="str"),
    })
    return train, test


def test_numeric_detection_does_not_rely_on_object_dtype(frames):
    train, _ = frames
    assert str(train["Zone"].dtype) != "object"  # pandas 3: 'str'
    pre = fit_preprocessor(train)
    assert list(pre.numeric_) == ["Area"]
    assert pre.categories_ == {"Zone": ["RL", "RM"]}
    assert pre.feature_names_ == ["Area", "Zone_RL", "Zone_RM", "Zone_nan"]


def test_fit_on_training_rows_only_by_default(frames):
    train, test = frames
    pre = fit_preprocessor(train)
    mean, std = pre.numeric_["Area"]
    assert mean == pytest.approx(200.0)
    assert std == pytest.approx(100.0)  # ddof=1, as pandas
    book = fit_preprocessor(train, test)
    assert book.numeric_["Area"][0] == pytest.approx(np.mean([100, 200, 300, 1000, 150]))
    assert "FV" in book.categories_["Zone"]


def test_transform_standardizes_imputes_and_one_hots(frames):
    train, test = frames
    pre = fit_preprocessor(train)
    X, report = pre.transform(train)
    assert X.dtype == np.float32 and X.shape == (4, 4)
    np.testing.assert_allclose(X[:, 0], [-1.0, 0.0, 0.0, 1.0])  # NaN -> 0 after scaling
    np.testing.assert_array_equal(X[:, 1:], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    assert report.unseen == {} and report.missing == {"Area": 1}
    Xt, report = pre.transform(test)
    np.testing.assert_array_equal(Xt[0, 1:], [0, 0, 0])  # unseen 'FV' -> all zeros
    assert report.unseen == {"Zone": 1}
    assert report.out_of_range == {"Area": 1}  # 1000 > the training maximum 300


def test_roundtrip_through_json_dict(frames):
    train, test = frames
    pre = fit_preprocessor(train)
    again = Preprocessor.from_dict(pre.to_dict())
    np.testing.assert_array_equal(pre.transform(test)[0], again.transform(test)[0])


def test_text_in_numeric_column_names_column_and_row(frames):
    train, test = frames
    pre = fit_preprocessor(train)
    bad = test.assign(Area=pd.array(["1000", "lots"], dtype="str"))
    with pytest.raises(DataError, match=r"column Area .*'lots' at Id=6"):
        pre.transform(bad)


def test_missing_column_is_listed(frames):
    train, test = frames
    with pytest.raises(DataError, match="lacks column.*Zone"):
        fit_preprocessor(train).transform(test.drop(columns=["Zone"]))


def test_feature_switches_log_derive_ordinal_and_recode():
    rng = np.random.default_rng(0)
    n = 200
    train = pd.DataFrame({
        "Id": range(n), "LotArea": rng.lognormal(9, 1, n), "YrSold": 2008,
        "YearBuilt": rng.integers(1900, 2008, n), "YearRemodAdd": 2000,
        "TotalBsmtSF": 500.0, "1stFlrSF": 800.0, "2ndFlrSF": rng.choice([0.0, 400.0], n),
        "ExterQual": rng.choice(["TA", "Gd", "Ex"], n),
        "MSSubClass": rng.choice([20, 60], n), "Neighborhood": rng.choice(["A", "B"], n),
        "SalePrice": 1e5,
    })
    plain = fit_preprocessor(train)
    from tasks.config import PreprocessConfig

    pre = fit_preprocessor(train, config=PreprocessConfig())
    assert "LotArea" in pre.log1p_ and "LotArea" not in plain.log1p_
    assert {"TotalSF", "HouseAge", "RemodAge", "ExterQualScore"} <= set(pre.numeric_)
    assert pre.categories_["MSSubClass"] == ["20", "60"]  # a code, not a quantity
    X, _ = pre.transform(train)
    names = pre.feature_names_
    total = X[:, names.index("TotalSF")] * pre.numeric_["TotalSF"][1] + pre.numeric_["TotalSF"][0]
    np.testing.assert_allclose(total, 1300 + train["2ndFlrSF"], rtol=1e-5)
    score = dict(zip(train["ExterQual"], X[:, names.index("ExterQualScore")], strict=False))
    assert score["TA"] < score["Gd"] < score["Ex"]
    # Floor area by neighbourhood: the area on that neighbourhood's rows, 0 on the others,
    # standardized but never log1p (a slope per category).
    for level in ("A", "B"):
        name = f"TotalSF@Neighborhood={level}"
        assert name not in pre.log1p_
        mean, std = pre.numeric_[name]
        raw = X[:, names.index(name)] * std + mean
        expect = np.where(train["Neighborhood"] == level, 1300 + train["2ndFlrSF"], 0.0)
        np.testing.assert_allclose(raw, expect, rtol=1e-5, atol=1e-3)
    # Switched off: the book's plain columns only.
    assert set(plain.numeric_) == {"LotArea", "YrSold", "YearBuilt", "YearRemodAdd",
                                   "TotalBsmtSF", "1stFlrSF", "2ndFlrSF", "MSSubClass"}
    again = Preprocessor.from_dict(pre.to_dict())
    np.testing.assert_array_equal(again.transform(train)[0], X)
    # A row whose neighbourhood was never seen has no slope of its own (and is reported).
    new = train.head(1).assign(Neighborhood="Atlantis")
    row, report = pre.transform(new)
    for level in ("A", "B"):
        name = f"TotalSF@Neighborhood={level}"
        assert row[0, names.index(name)] == pytest.approx(-pre.numeric_[name][0]
                                                          / pre.numeric_[name][1])
    assert report.unseen == {"Neighborhood": 1}


def test_interactions_name_columns_that_exist():
    from pydantic import ValidationError

    from tasks.config import PreprocessConfig

    train = pd.DataFrame({"Id": [1, 2, 3], "LotArea": [1.0, 2.0, 3.0],
                          "Street": ["a", "b", "a"], "SalePrice": 1e5})
    with pytest.raises(DataError, match="no categorical feature 'Nowhere'; fix the config"):
        fit_preprocessor(train, config=PreprocessConfig(interactions=("LotArea@Nowhere",)))
    pre = fit_preprocessor(train, config=PreprocessConfig(interactions=("LotArea@Street",)))
    assert {"LotArea@Street=a", "LotArea@Street=b"} <= set(pre.numeric_)
    with pytest.raises(ValidationError, match="is not 'numeric@categorical'"):
        PreprocessConfig(interactions=("LotArea",))
    with pytest.raises(ValidationError, match="use a derived column: set derived = true"):
        PreprocessConfig(derived=False)


def test_real_training_file(real_data):
    train = read_csv(real_data / "kaggle_house_pred_train.csv")
    pre = fit_preprocessor(train)
    X, _ = pre.transform(train)
    # 36 numeric + one-hot of 43 categoricals (the book's train+test fit gives 331)
    assert X.shape == (1460, 330)
    assert np.isfinite(X).all()
    assert "MSSubClass" in pre.numeric_ and "MSZoning" in pre.categories_


def test_empty_file_is_a_clear_error(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_csv(tmp_path / "e.csv")


def test_only_right_skewed_columns_are_log_transformed():
    """log1p compresses a long right tail; applied to a left-skewed column it would stretch
    the tail further, so such a column is left as it is."""
    from tasks.config import PreprocessConfig

    rng = np.random.default_rng(1)
    n = 300
    right = rng.lognormal(3, 1, n)
    left = 100 - rng.lognormal(2, 0.8, n).clip(max=99)  # non-negative, long left tail
    train = pd.DataFrame({"Id": range(n), "Right": right, "Left": left, "SalePrice": 1e5})
    assert pd.Series(left).skew() < -0.75 < 0.75 < pd.Series(right).skew()
    pre = fit_preprocessor(train, config=PreprocessConfig(interactions=()))
    assert "Right" in pre.log1p_ and "Left" not in pre.log1p_


@pytest.mark.parametrize("switches", [
    {"log1p_skewed": False, "derived": False, "ordinal": False, "as_category": (),
     "interactions": ()},
    {},  # the defaults: log1p of right skew, derived sums, ordinal scores, MSSubClass as text,
    # floor area by neighbourhood
])
@pytest.mark.parametrize("source", ["csv", "parquet-by-pandas", "parquet-by-pyarrow"])
def test_encoding_arrow_batches_equals_encoding_the_frame(real_data, tmp_path, switches,
                                                          source):
    """Batch predict encodes the Arrow batches it reads (no pandas frame): the same numerics,
    codes and drift report as training's pandas path, whatever wrote the file."""
    from collections import Counter

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from tasks.config import PreprocessConfig
    from tasks.data.features import ID, read_csv
    from tasks.inference.batch import normalize, open_rows

    train = read_csv(real_data / "kaggle_house_pred_train.csv").drop(columns=["SalePrice"])
    pre = fit_preprocessor(train, config=PreprocessConfig(**switches))
    rows = read_csv(real_data / "kaggle_house_pred_test.csv")
    # drift of every kind: an unseen category, a grade nobody uses, a missing and a huge
    # number, a code never seen (MSSubClass 999), text that is a number
    rows.loc[0, "Neighborhood"] = "Atlantis"
    rows.loc[1, "KitchenQual"] = "Superb"
    rows.loc[2, "LotArea"] = np.nan
    rows.loc[3, "GrLivArea"] = 1e7
    rows.loc[4, "MSSubClass"] = 999
    path = tmp_path / "rows.csv"
    rows.to_csv(path, index=False)
    if source == "parquet-by-pandas":
        path = tmp_path / "rows.parquet"
        rows.to_parquet(path)
    elif source == "parquet-by-pyarrow":  # "NA" and friends as text, LotFrontage as text
        table = pacsv.read_csv(tmp_path / "rows.csv", convert_options=pacsv.ConvertOptions(
            strings_can_be_null=False, column_types={"LotFrontage": "string"}))
        path = tmp_path / "rows-pa.parquet"
        pq.write_table(table, path)
    _, chunks = open_rows(path, pre, 500)
    want = pre.encode(rows)
    got_parts = [pre.encode_table(normalize(t.select([ID, *pre.columns_]))) for t in chunks]
    for col in want.numeric:
        np.testing.assert_array_equal(np.concatenate([g.numeric[col] for g in got_parts]),
                                      want.numeric[col], err_msg=col)
    np.testing.assert_array_equal(  # the features, interactions included
        np.concatenate([pre.features(g, pre.categories_, pre.feature_names_)
                        for g in got_parts]),
        pre.features(want, pre.categories_, pre.feature_names_))
    for col in pre.categories_:
        np.testing.assert_array_equal(np.concatenate([g.codes[col] for g in got_parts]),
                                      want.codes[col], err_msg=col)
    for k in ("unseen", "out_of_range", "missing"):
        total = Counter()
        for g in got_parts:
            total.update(getattr(g.report, k))
        assert dict(total) == getattr(want.report, k), k
    assert sum(g.report.rows_drifted for g in got_parts) == want.report.rows_drifted
    assert want.report.unseen["Neighborhood"] == 1


def test_text_in_a_numeric_parquet_column_is_the_same_one_line_error(real_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.data.features import ID, DataError, read_csv
    from tasks.inference.batch import normalize, open_rows

    train = read_csv(real_data / "kaggle_house_pred_train.csv").drop(columns=["SalePrice"])
    pre = fit_preprocessor(train)
    rows = read_csv(real_data / "kaggle_house_pred_test.csv").head(20)
    table = pa.Table.from_pandas(rows, preserve_index=False)
    lot = rows["LotArea"].astype(str).tolist()
    lot[7] = "big"
    table = table.set_column(table.schema.get_field_index("LotArea"), "LotArea",
                             pa.array(lot, pa.string()))
    pq.write_table(table, tmp_path / "bad.parquet")
    _, chunks = open_rows(tmp_path / "bad.parquet", pre, 100)
    with pytest.raises(DataError, match=rf"column LotArea must be numeric but has 'big' at "
                                        rf"Id={rows[ID][7]}"):
        pre.encode_table(normalize(next(chunks)))
