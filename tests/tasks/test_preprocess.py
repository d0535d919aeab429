from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.preprocess import (
    DataError,
    Preprocessor,
    fit_preprocessor,
    read_csv,
    validate_training_frame,
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
    X, unseen = pre.transform(train)
    assert X.dtype == np.float32 and X.shape == (4, 4)
    np.testing.assert_allclose(X[:, 0], [-1.0, 0.0, 0.0, 1.0])  # NaN -> 0 after scaling
    np.testing.assert_array_equal(X[:, 1:], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    assert unseen == {}
    Xt, unseen = pre.transform(test)
    np.testing.assert_array_equal(Xt[0, 1:], [0, 0, 0])  # unseen 'FV' -> all zeros
    assert unseen == {"Zone": 1}


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


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda df: df.drop(columns=["SalePrice"]), "lacks column.*SalePrice"),
        (lambda df: df.iloc[0:0], "no rows"),
        (lambda df: df.assign(SalePrice=[1.0, -5.0, 2.0, 3.0]), r"positive; bad rows Id=\[2\]"),
        (lambda df: df.assign(Id=[1, 1, 2, 3]), r"duplicate Id values \[1\]"),
        (lambda df: df.assign(SalePrice=["1", "x", "2", "3"]), "not numeric.*Id=2"),
    ],
)
def test_training_frame_validation(frames, change, message):
    with pytest.raises(DataError, match=message):
        validate_training_frame(change(frames[0]))


def test_real_training_file(real_data):
    train = read_csv(real_data / "kaggle_house_pred_train.csv")
    validate_training_frame(train)
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
