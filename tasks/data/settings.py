"""The preprocessing settings (``[preprocess]``) and the derived columns they name: plain
pydantic and constants, so a config validates without importing pandas or pyarrow."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from tasks.frozen import Frozen

# The derived columns (``preprocess.derived``): each a weighted sum of raw columns.
DERIVED_SUMS = {
    "TotalSF": {"TotalBsmtSF": 1.0, "1stFlrSF": 1.0, "2ndFlrSF": 1.0},
    "TotalBath": {"FullBath": 1.0, "HalfBath": 0.5, "BsmtFullBath": 1.0, "BsmtHalfBath": 0.5},
    "TotalPorchSF": {"OpenPorchSF": 1.0, "EnclosedPorch": 1.0, "3SsnPorch": 1.0,
                     "ScreenPorch": 1.0, "WoodDeckSF": 1.0},
    "HouseAge": {"YrSold": 1.0, "YearBuilt": -1.0},
    "RemodAge": {"YrSold": 1.0, "YearRemodAdd": -1.0},
}


class PreprocessConfig(Frozen):
    """Standardize numerics, one-hot categoricals (with a missing-value indicator), and the
    feature switches. Everything is fitted on the training rows only (unless ``fit_on``)."""

    # The all-rows preprocessor does not depend on it (tensorize's fold matrices do, and
    # tensorize is given the folds when it is on).
    _unversioned = frozenset({"per_fold"})

    fit_on: Literal["train", "train+test"] = Field(
        "train",
        description="rows the statistics and categories are fitted on; 'train+test' is the "
        "book's exact (leaky) recipe",
    )
    log1p_skewed: bool = Field(
        True, description="log1p non-negative numeric features whose training skew exceeds "
        "the threshold (right skew only; left-skewed columns are left as they are)"
    )
    skew_threshold: Annotated[float, Field(gt=0)] = 0.75
    derived: bool = Field(
        True, description="add total floor area, total baths, porch area, age, remodel age"
    )
    ordinal: bool = Field(
        True, description="quality/condition columns also as ordered numbers (Po=1..Ex=5)"
    )
    as_category: tuple[str, ...] = Field(
        ("MSSubClass",), description="numeric-coded columns to one-hot instead (codes, not "
        "quantities)",
    )
    interactions: tuple[str, ...] = Field(
        ("TotalSF@Neighborhood",), description="'numeric@categorical' pairs: for each category "
        "seen in training, a feature that is the numeric value on rows of that category and 0 "
        "elsewhere (standardized, never log1p), so linear models fit a slope per category: "
        "a price per square foot by neighbourhood",
    )
    per_fold: bool = Field(
        True, description="cross-validate honestly: fit a preprocessor on each fold's "
        "training rows (statistics, which columns get log1p, category lists), as "
        "scikit-learn's Pipeline inside cross_val_score does; each fold model is stored with "
        "its own preprocessor. False: one preprocessor fitted on every training row, "
        "validation rows included (the book's way; flatters the score by about 0.002)",
    )

    @field_validator("interactions")
    @classmethod
    def _interactions_are_pairs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for spec in value:
            parts = spec.split("@")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{spec!r} is not 'numeric@categorical' (e.g. "
                                 "'TotalSF@Neighborhood')")
        return value

    @model_validator(mode="after")
    def _interactions_need_their_columns(self) -> PreprocessConfig:
        if self.derived or not self.interactions:
            return self
        derived = [s for s in self.interactions if s.split("@")[0] in DERIVED_SUMS]
        if derived:
            raise ValueError(f"interactions {derived} use a derived column: set derived = "
                             "true, or interactions = []")
        return self
