from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.data.features import DataError
from tasks.predict import FittedModel, predict_file
from tasks.storage.artifacts import resolve
from tasks.tensorize import read_fold_features


@pytest.fixture(scope="module")
def model(trained):
    cfg, result = trained
    return FittedModel.load(resolve(cfg.artifacts_dir, "select").file("model.pt"))


def test_chunked_prediction_equals_one_pass(model, real_data, tmp_path):
    test_csv = real_data / "kaggle_house_pred_test.csv"
    stats = predict_file(model, test_csv, tmp_path / "one.csv", chunk_size=10_000)
    assert (tmp_path / "one.csv").read_text().splitlines()[1].startswith("1461,")  # unquoted
    predict_file(model, test_csv, tmp_path / "many.csv", chunk_size=97)
    one, many = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "many.csv")
    assert stats["rows"] == 1459 and list(one.columns) == ["Id", "SalePrice"]
    pd.testing.assert_frame_equal(one, many, rtol=1e-5)
    assert one["Id"].tolist() == pd.read_csv(test_csv)["Id"].tolist()
    # The streamed file equals the reference path on the whole frame at once, by Id.
    want = np.exp(model.predict_frame(pd.read_csv(test_csv))[0])
    np.testing.assert_allclose(one["SalePrice"].to_numpy(), want, rtol=1e-5)


def test_parquet_input_gives_same_predictions(model, real_data, tmp_path):
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv")
    raw.to_parquet(tmp_path / "in.parquet")
    predict_file(model, tmp_path / "in.parquet", tmp_path / "pq.csv", chunk_size=500)
    predict_file(model, real_data / "kaggle_house_pred_test.csv", tmp_path / "csv.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "pq.csv"),
                                  pd.read_csv(tmp_path / "csv.csv"), rtol=1e-5)


def test_missing_columns_are_listed_and_nothing_is_written(model, real_data, tmp_path):
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv")
    raw.drop(columns=["LotArea", "Neighborhood"]).to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "out.csv"
    with pytest.raises(DataError, match="lacks 2 column.*LotArea, Neighborhood"):
        predict_file(model, tmp_path / "in.csv", out)
    assert list(tmp_path.iterdir()) == [tmp_path / "in.csv"]


def test_unseen_category_and_extra_column_warn(model, real_data, tmp_path):
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv").head(20)
    raw.loc[:2, "Neighborhood"] = "Atlantis"
    raw["Comment"] = "x"
    raw.to_csv(tmp_path / "in.csv", index=False)
    warnings = []
    stats = predict_file(model, tmp_path / "in.csv", tmp_path / "out.csv", warn=warnings.append)
    assert stats["unseen_categories"] == {"Neighborhood": 3}
    assert stats["ignored_columns"] == ["Comment"]
    assert any("Comment" in w for w in warnings) and any("unseen" in w for w in warnings)
    assert len(pd.read_csv(tmp_path / "out.csv")) == 20


def test_header_only_input_gives_header_only_output(model, real_data, tmp_path):
    header = (real_data / "kaggle_house_pred_test.csv").read_text().splitlines()[0]
    (tmp_path / "in.csv").write_text(header + "\n")
    stats = predict_file(model, tmp_path / "in.csv", tmp_path / "out.csv")
    assert stats["rows"] == 0
    assert (tmp_path / "out.csv").read_text() == "Id,SalePrice\n"


def test_far_out_of_range_numerics_are_predicted_and_counted_in_drift_summary(
        model, real_data, tmp_path):
    import json

    from tasks.predict import drift_path

    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv").head(50)
    raw.loc[:4, "GrLivArea"] = 20_000  # far beyond any training house (5642 sq ft)
    raw.loc[5:6, "LotArea"] = None  # missing: imputed as in training
    raw.loc[7:8, "YearBuilt"] = 1500  # and the house age the model derives from it
    raw.to_csv(tmp_path / "in.csv", index=False)
    warnings = []
    predict_file(model, tmp_path / "in.csv", tmp_path / "out.csv", warn=warnings.append)
    out = pd.read_csv(tmp_path / "out.csv")
    assert len(out) == 50 and out["SalePrice"].notna().all() and (out["SalePrice"] > 0).all()
    drift = json.loads(drift_path(tmp_path / "out.csv").read_text())
    assert drift["rows"] == 50
    assert drift["out_of_training_range"]["GrLivArea"] == 5
    assert drift["imputed_missing"]["LotArea"] >= 2
    assert any("outside the training range" in w for w in warnings)
    # Keyed by the file's own columns; what the model derives from them is reported apart.
    own = set(model.preprocessor.columns_)
    assert set(drift["out_of_training_range"]) <= own
    assert set(drift["imputed_missing"]) <= own
    assert drift["out_of_training_range"]["YearBuilt"] == 2
    assert drift["derived_features"]["out_of_training_range"]["HouseAge"] == 2
    assert not set(drift["derived_features"]["out_of_training_range"]) & own
    assert not any("HouseAge" in w for w in warnings)


def test_missing_numeric_is_imputed_with_the_training_mean(model, real_data):
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv",
                      dtype=model.preprocessor.raw_dtypes()).head(3)
    pre = model.preprocessor
    X, report = pre.transform(raw.assign(LotArea=float("nan")))
    j = pre.feature_names_.index("LotArea")
    assert (X[:, j] == 0.0).all() and report.missing["LotArea"] == 3  # 0 = the mean


def test_text_in_a_numeric_column_names_column_and_first_bad_row(model, real_data, tmp_path):
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv").head(30)
    raw["LotArea"] = raw["LotArea"].astype(str)
    raw.loc[7, "LotArea"] = "big"
    raw.to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(DataError, match=rf"column LotArea .*'big' at Id={raw.loc[7, 'Id']}"):
        predict_file(model, tmp_path / "in.csv", tmp_path / "out.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_empty_parquet_input_gives_header_only_output(model, real_data, tmp_path):
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv").head(0)
    raw.to_parquet(tmp_path / "in.parquet")
    stats = predict_file(model, tmp_path / "in.parquet", tmp_path / "out.csv")
    assert stats["rows"] == 0 and (tmp_path / "out.csv").read_text() == "Id,SalePrice\n"


def test_each_fold_model_reads_rows_through_its_own_folds_preprocessor(model, trained,
                                                                     real_data):
    """Per-fold preprocessing end to end: tensorize fitted fold k's preprocessor on fold k's
    training rows only, and the checkpoint pairs fold k's models with it, so predicting a
    fold's validation rows from the checkpoint gives the train stage's out-of-fold
    predictions."""
    import json

    import numpy as np

    from tasks.data.features import ID
    from tasks.data.folds import make_folds
    from tasks.storage.artifacts import ArtifactRef

    cfg, _ = trained
    upstream = resolve(cfg.artifacts_dir, "select").manifest()["upstream"]["trained"]
    refs = [ArtifactRef(root=cfg.artifacts_dir, **u) for u in upstream]
    data = ArtifactRef(root=cfg.artifacts_dir, **refs[0].manifest()["upstream"]["data"])
    saved = json.loads(data.file("fold_preprocessors.json").read_text())
    assert saved["folds"] == cfg.train.folds.model_dump(mode="json")
    n_folds = cfg.train.n_splits * cfg.train.repeats
    assert len(model.fold_preprocessors) == n_folds
    train = pd.read_csv(real_data / "kaggle_house_pred_train.csv")
    folds = make_folds(len(train), cfg.train.n_splits, cfg.train.seed, cfg.train.fold_scheme,
                       cfg.train.repeats)
    for (rows, _), pre in zip(folds, model.fold_preprocessors, strict=True):
        alone = model.preprocessor.unfitted().fit([train.iloc[rows]])
        # its rows' statistics, log1p choices and categories, nothing else
        assert sorted(pre.numeric_) == sorted(alone.numeric_)
        assert pre.categories_ == alone.categories_
        np.testing.assert_allclose([pre.numeric_[c] for c in alone.numeric_],
                                   list(alone.numeric_.values()), rtol=1e-9)  # float sums
        assert sorted(pre.log1p_) == sorted(alone.log1p_)
        assert pre.numeric_ != model.preprocessor.numeric_
    maps = read_fold_features(data, cfg.train.folds)
    assert maps.shape == (n_folds, len(train), len(model.preprocessor.feature_names_))
    # the base holds the matrix and a few columns, not a matrix per fold
    assert maps.base.shape[1] < 1.2 * len(model.preprocessor.feature_names_)
    np.testing.assert_allclose(maps[n_folds - 1], model.fold_preprocessors[-1].transform_as(
        train, model.preprocessor.feature_names_), rtol=1e-5, atol=2e-5)
    by_name = {json.loads(r.file("metrics.json").read_text())["candidate"]: r for r in refs}
    ensembles = [(spec, members) for _, spec, members, refit in model.components if not refit]
    assert ensembles  # (linear kinds stay fold ensembles under every select.final but refit)
    for spec, members in ensembles:
        ref = by_name[spec.name]
        oof = pd.read_parquet(ref.file("oof.parquet"))
        for k, ((_, valid), fold_members) in enumerate(zip(folds, members, strict=True)):
            rows = train.iloc[valid]
            X = model.fold_preprocessors[k].transform_as(rows, model.preprocessor.feature_names_)
            pred = np.mean([m.log_price(X) for m in fold_members], axis=0)
            fold = oof[oof["fold"] == k].set_index(ID)  # numbered over all repeats
            np.testing.assert_allclose(pred, fold.loc[rows[ID], "pred_log_price"], rtol=1e-5)


def test_csv_and_parquet_written_by_pyarrow_predict_the_same(model, real_data, tmp_path):
    """One missing-value rule for both formats: the Kaggle test file converted with
    pyarrow's own CSV reader (which keeps "NA" in text columns as the text "NA") predicts
    exactly as the CSV does, with the same drift counted."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    test_csv = real_data / "kaggle_house_pred_test.csv"
    pq.write_table(pacsv.read_csv(test_csv), tmp_path / "in.parquet")
    warned_csv, warned_pq = [], []
    d_csv = predict_file(model, test_csv, tmp_path / "csv.csv", warn=warned_csv.append)
    d_pq = predict_file(model, tmp_path / "in.parquet", tmp_path / "pq.csv",
                        warn=warned_pq.append)
    a, b = pd.read_csv(tmp_path / "csv.csv"), pd.read_csv(tmp_path / "pq.csv")
    pd.testing.assert_frame_equal(a, b, rtol=1e-12)
    assert d_csv == d_pq and len(warned_csv) == len(warned_pq)
    assert d_csv["unseen_categories"] == {"MSSubClass": 1}  # not 7,549 "NA" categories


def test_parquet_output_holds_the_same_predictions(model, real_data, tmp_path):
    test_csv = real_data / "kaggle_house_pred_test.csv"
    predict_file(model, test_csv, tmp_path / "out.csv")
    predict_file(model, test_csv, tmp_path / "out.parquet", chunk_size=300)
    # (other chunk sizes: float32 matrix products may round differently, ~1e-9). A CSV's
    # Ids are text, kept as given (001461 stays 001461), in either output.
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out.parquet"),
                                  pd.read_csv(tmp_path / "out.csv", dtype={"Id": str}),
                                  rtol=1e-6, check_dtype=False)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_duplicate_ids_are_an_error_naming_them_and_nothing_is_written(model, real_data,
                                                                       tmp_path, fmt):
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv").head(50)
    raw.loc[40, "Id"] = raw.loc[3, "Id"]
    path = tmp_path / f"in.{fmt}"
    raw.to_csv(path, index=False) if fmt == "csv" else raw.to_parquet(path)
    with pytest.raises(DataError, match=rf"1 Id value.*more than once: {raw.loc[3, 'Id']};"):
        predict_file(model, path, tmp_path / "out.csv", chunk_size=20)  # across chunks
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_row_without_an_id_is_an_error_naming_the_row(model, real_data, tmp_path):
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv").head(30)
    raw["Id"] = raw["Id"].astype("Int64")
    raw.loc[12, "Id"] = pd.NA
    raw.to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(DataError, match="1 row.*no Id.*data row 13"):
        predict_file(model, tmp_path / "in.csv", tmp_path / "out.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_an_empty_parquet_file_with_the_wrong_columns_is_an_error(model, tmp_path):
    pd.DataFrame({"Id": pd.Series([], dtype="int64"),
                  "Color": pd.Series([], dtype="str")}).to_parquet(tmp_path / "in.parquet")
    with pytest.raises(DataError, match="in.parquet lacks .* column"):
        predict_file(model, tmp_path / "in.parquet", tmp_path / "out.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


@pytest.mark.parametrize(("column", "value", "shown"), [
    ("LotArea", "inf", "inf"), ("OverallQual", "1e39", "1e+39"), ("LotArea", "1e300", "1e+300"),
    ("YearBuilt", "-5000", "-5000"), ("GrLivArea", "1000000", "1e+06")])
def test_a_value_no_house_has_is_one_error_and_nothing_is_written(
        model, real_data, tmp_path, column, value, shown):
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv", dtype=str).head(20)
    raw.loc[3, column] = value
    raw.to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(DataError) as err:
        predict_file(model, tmp_path / "in.csv", tmp_path / "out.csv", warn=lambda _: None)
    assert str(err.value) == (
        f"{tmp_path / 'in.csv'}: column {column} has {shown} at Id={raw.loc[3, 'Id']}, far "
        "outside what the model was trained on (a typing or unit error?); fix the value, "
        "or leave it empty to have it imputed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_ids_come_back_exactly_as_given(model, real_data, tmp_path):
    raw = pd.read_csv(real_data / "kaggle_house_pred_test.csv", dtype=str).head(4)
    raw["Id"] = ["001461", "0042", "42", "A-7"]
    raw.to_csv(tmp_path / "in.csv", index=False)
    predict_file(model, tmp_path / "in.csv", tmp_path / "out.csv", warn=lambda _: None)
    out = pd.read_csv(tmp_path / "out.csv", dtype=str)
    assert out["Id"].tolist() == ["001461", "0042", "42", "A-7"]
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["Id", "001461", "0042", "42", "A-7"]
    raw["Id"] = ['a,"b"', "2", "3", "4"]  # one that needs quotes: quoted as CSV quotes it
    raw.to_csv(tmp_path / "quoted.csv", index=False)
    predict_file(model, tmp_path / "quoted.csv", tmp_path / "q-out.csv", warn=lambda _: None)
    assert pd.read_csv(tmp_path / "q-out.csv", dtype=str)["Id"].tolist() == [
        'a,"b"', "2", "3", "4"]
    raw["Id"] = ["0042", "0042", "1", "2"]
    raw.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError, match="1 Id value.* more than once: 0042"):
        predict_file(model, tmp_path / "dup.csv", tmp_path / "dup-out.csv")


@pytest.mark.parametrize("where", ["dir", "drift-dir", "under-a-file"])
def test_an_output_that_cannot_be_a_file_is_one_line_and_nothing_is_left(
        model, real_data, tmp_path, where):
    out = tmp_path / "out"
    if where == "dir":
        out.mkdir()
    elif where == "drift-dir":
        (tmp_path / "out.drift.json").mkdir()
        out = tmp_path / "out.json"
    else:
        out.write_text("a file")
        out = out / "predictions.csv"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match=r"^--out .*(is a directory|is a file, not a folder)"):
        predict_file(model, real_data / "kaggle_house_pred_test.csv", out)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(("name", "content", "words"), [
    ("absent.csv", None, "input file not found: {path}"),
    ("rows.xlsx", b"PK\x03\x04", "cannot read {path}: use a .csv or .parquet file"),
    ("broken.parquet", b"PAR1 not really", "cannot read {path} as Parquet: "),
    ("empty.csv", b"", "{path} is empty: expected at least a header line"),
])
def test_an_input_that_cannot_be_read_is_one_line_and_nothing_is_written(
        model, tmp_path, name, content, words):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out" / "p.csv"
    with pytest.raises(DataError) as err:
        predict_file(model, path, out)
    assert str(err.value).startswith(words.format(path=path))
    assert len(str(err.value).splitlines()) == 1 and not out.parent.exists()
