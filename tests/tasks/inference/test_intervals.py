"""Calibrated ranges: coverage on new rows with a known noise level, widths that follow the
noise, the stored form read back as data, and bad levels refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold, cross_val_predict

from tasks.data.features import DataError
from tasks.inference import intervals


def _houses(rng, n):
    """Log prices from 8 features, noise 0.05 for most houses and 0.2 for cheap ones: the
    noise is known, and not the same everywhere."""
    X = rng.normal(size=(n, 8))
    mean = 12.0 + X @ np.linspace(0.3, -0.2, 8)
    noise = np.where(mean < 11.7, 0.2, 0.05)
    return X, mean + noise * rng.normal(size=n), noise


def test_ranges_from_out_of_fold_residuals_cover_new_rows_at_the_level():
    rng = np.random.default_rng(7)
    X, y, _ = _houses(rng, 3_000)
    folds = KFold(5, shuffle=True, random_state=0)
    oof = cross_val_predict(Ridge(1e-3), X, y, cv=folds)
    fold = np.empty(len(y), int)
    for k, (_, held) in enumerate(folds.split(X)):
        fold[held] = k
    cal = intervals.fit(oof, y)
    model = Ridge(1e-3).fit(X, y)
    Xn, yn, noise = _houses(rng, 100_000)
    pred = model.predict(Xn)
    for level in (0.8, 0.9, 0.95):
        lo, hi = cal.bounds(pred, level)
        covered = np.mean((np.exp(yn) >= lo) & (np.exp(yn) <= hi))
        assert level - 0.02 <= covered <= level + 0.02, (level, covered)
    # Adaptive: the noisy houses get wider ranges, and each noise level keeps its coverage
    # better than one width for all would (the cheap houses' coverage with one width is low).
    h = cal.half_width(pred, 0.9)
    assert np.median(h[noise == 0.2]) > 2 * np.median(h[noise == 0.05])
    noisy = noise == 0.2
    assert np.mean(np.abs(yn - pred)[noisy] <= h[noisy]) > 0.8
    one_width = intervals.fit(oof, y, max_bands=1)
    assert np.mean(np.abs(yn - pred)[noisy] <= one_width.half_width(pred, 0.9)[noisy]) < 0.7
    # The out-of-fold estimate says the same as the new rows, within sampling error.
    for row in intervals.oof_coverage(oof, y, fold):
        assert abs(row["coverage"] - row["level"]) <= 0.02, row
        assert row["median_width"] > 0 and 0 < row["median_relative_width"] < 1


def test_the_out_of_fold_coverage_calibrates_each_fold_on_the_others():
    # Fold 0's residuals are forty times the others': calibrated on the other folds, its
    # rows are nearly all outside their ranges. Calibrating on all rows (its own too) would
    # hide it behind a 90% that is exact by construction.
    rng = np.random.default_rng(1)
    n = 2_000
    fold = np.arange(n) % 5
    pred = rng.normal(12, 0.3, n)
    y = pred + rng.normal(size=n) * np.where(fold == 0, 2.0, 0.05)
    honest = intervals.oof_coverage(pred, y, fold, levels=(0.9,))[0]["coverage"]
    own = np.mean(np.abs(y - pred) <= intervals.fit(pred, y).half_width(pred, 0.9))
    assert honest < 0.85 and abs(own - 0.9) < 0.01


def test_a_band_thinned_to_its_order_statistics_never_narrows_a_range():
    rng = np.random.default_rng(3)
    r = rng.standard_t(3, size=50_001)
    band = intervals.fit(np.zeros_like(r), r, max_bands=1).bands[0]
    assert band.n == len(r) and len(band.scores) <= intervals.MAX_SCORES
    exact = np.sort(np.abs(r))
    for level in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999):
        k = int(np.ceil((len(r) + 1) * level))
        assert exact[k - 1] <= band.quantile(level) <= exact[min(k + 30, len(r) - 1)]


@pytest.mark.parametrize("level", [0, 1, -0.1, 1.5, float("nan"), "ninety"])
def test_a_level_outside_zero_and_one_is_a_one_line_error(level):
    with pytest.raises(ValueError, match=r"^--interval .*between 0 and 1") as exc:
        intervals.check_level(level)
    assert "\n" not in str(exc.value)


def test_a_level_the_bands_cannot_serve_names_the_highest_they_can():
    rng = np.random.default_rng(0)
    cal = intervals.fit(rng.normal(12, 0.4, 1_000), rng.normal(12, 0.4, 1_000))
    assert [b.n for b in cal.bands] == [200] * 5
    cal.check(0.99)
    assert np.isfinite(cal.half_width(np.array([11.0, 12.0, 13.0]), 0.99)).all()
    with pytest.raises(ValueError, match=r"^--interval 0.999: .* 200 rows, enough for levels "
                                         r"up to 0.995; pick a lower one$"):
        cal.check(0.999)


def test_the_stored_form_round_trips_as_plain_json(tmp_path):
    rng = np.random.default_rng(5)
    p = rng.normal(12, 0.4, 5_000)
    cal = intervals.fit(p, p + rng.normal(0, 0.1, 5_000))
    cov = intervals.oof_coverage(p, p, np.arange(5_000) % 5)
    intervals.save(cal, cov, tmp_path)
    back = intervals.load(tmp_path / intervals.INTERVALS_JSON)
    assert np.array_equal(back.half_width(p, 0.9), cal.half_width(p, 0.9))
    assert json.loads((tmp_path / intervals.INTERVALS_JSON).read_text())["coverage"] == cov
    assert intervals.load(tmp_path / "none.json") is None  # a model from before ranges


def _spec():
    return {"format": 1, "edges": [12.0],
            "bands": [{"n": 3, "ranks": [1, 2, 3], "scores": [0.1, 0.2, 0.3]},
                      {"n": 2, "ranks": [1, 2], "scores": [0.1, 0.4]}]}


@pytest.mark.parametrize(("change", "why"), [
    (lambda s: s.update(format=2), "format 2"),
    (lambda s: s.update(edges=[12.0, 11.0]), "band edges"),
    (lambda s: s.update(edges=[]), "band edges"),
    (lambda s: s["bands"][0].update(scores=[0.3, 0.2, 0.1]), "a band's residuals"),
    (lambda s: s["bands"][0].update(ranks=[1, 2, 4]), "a band's residuals"),
    (lambda s: s["bands"][0].update(scores=[0.1, 0.2, float("nan")]), "a band's residuals"),
    (lambda s: s["bands"][1].update(scores=[-1.0, 0.4]), "a band's residuals"),
    (lambda s: s["bands"][1].update(n="__import__('os')"), "invalid literal"),
    (lambda s: s.pop("bands"), "'bands'"),
])
def test_a_malformed_intervals_file_is_one_line_naming_it(change, why):
    spec = _spec()
    intervals.Calibration.from_json(spec, "x")  # the unchanged one reads
    change(spec)
    with pytest.raises(DataError, match="^where/intervals.json: not a valid intervals file") as e:
        intervals.Calibration.from_json(spec, "where/intervals.json")
    assert why in str(e.value) and "\n" not in str(e.value)


def test_a_file_that_is_not_json_is_one_line(tmp_path):
    (tmp_path / "intervals.json").write_text("{not json")
    with pytest.raises(DataError, match="intervals.json: not valid JSON"):
        intervals.load(tmp_path / "intervals.json")
