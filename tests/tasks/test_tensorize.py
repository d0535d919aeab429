"""Tensorize's refusals: folds other than train's, names that are not unique, rows without
the columns the outlier rule reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.select import lineage
from tasks.storage.artifacts import ArtifactRef, resolve
from tasks.tensorize import outlier_ids, read_fold_features, write_matrix


def test_fold_features_cut_by_other_folds_are_refused(trained):
    cfg, result = trained
    (version,) = lineage(resolve(cfg.artifacts_dir, "select", result["model_version"]))[
        "tensorize"]
    data = ArtifactRef(root=cfg.artifacts_dir, stage="tensorize", version=version)
    own = cfg.train.folds
    assert read_fold_features(data, own).shape[0] == own.n_splits * own.repeats
    other = own.model_copy(update={"seed": own.seed + 1})
    with pytest.raises(ValueError, match=f"tensorize {data.version} holds folds .* train cuts "
                                         ".*; rerun from tensorize"):
        read_fold_features(data, other)


def test_feature_names_must_be_unique(tmp_path):
    with pytest.raises(ValueError, match="feature names are not unique"):
        write_matrix(tmp_path / "m.parquet", np.arange(2), np.zeros((2, 2), np.float32),
                     np.ones(2), ["a", "a"], {})
    assert not (tmp_path / "m.parquet").exists()


def test_the_outlier_rule_needs_the_living_area():
    rows = pd.DataFrame({"Id": [1, 2], "SalePrice": [100_000, 200_000],
                         "GrLivArea": [4500, 1000]})
    assert outlier_ids(rows) == [1]  # over 4000 square feet for under 300,000
    assert outlier_ids(rows.drop(columns="GrLivArea")) == []
