"""Calibrated price ranges: conformal intervals from the selected model's out-of-fold residuals.

Every residual the select stage keeps comes from a model that did not see its row (the
blend's from weights fitted on the other folds), which is what split/CV+ conformal
prediction asks for: the range of a new house at level ``L`` is the prediction ± the
``ceil((n + 1) L)``-th smallest of ``n`` absolute log residuals, and covers at least ``L`` of
new rows drawn like the training rows, whatever the model.

One width for every house would be too wide for the typical house and too narrow for the
unusual one. The residuals are grouped by predicted price band (Mondrian conformal: the
band's own residuals set its width), so a band where the model is less sure gets wider
ranges and each band keeps its coverage. The bands are quantiles of the predicted log price,
at least ``MIN_BAND_ROWS`` rows each.

``oof_coverage`` says how well this holds on the training rows without flattering it: the
rows of each fold get ranges calibrated (bands and quantiles) on the other folds' rows only.

Stored as plain JSON (``intervals.json`` beside the plan), checked on reading; a band of many
rows keeps up to ``MAX_SCORES`` of its order statistics, rounded up (a quantile between two
kept ranks takes the higher one, so thinning can only widen a range, never narrow it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.features import DataError

INTERVALS_JSON = "intervals.json"
FORMAT = 1
LEVELS = (0.8, 0.9, 0.95)  # what the model card reports
MIN_BAND_ROWS = 200  # a band's 95% quantile rests on at least 10 residuals beyond it
MAX_BANDS = 5
MAX_SCORES = 2_000


def check_level(level: float, what: str = "--interval") -> float:
    """``level`` as a float strictly between 0 and 1, or a one-line error."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {level!r}: a coverage level is a number between 0 and 1, "
                         "such as 0.9 for 90% ranges") from None
    if not 0 < value < 1:
        raise ValueError(f"{what} {level}: a coverage level is between 0 and 1 (exclusive), "
                         "such as 0.9 for 90% ranges")
    return value


@dataclass(frozen=True)
class Band:
    """One price band's absolute log residuals: ``n`` of them, of which the ``ranks``
    (1-based, increasing, the last ``n``) are kept as ``scores`` (non-decreasing)."""

    n: int
    ranks: np.ndarray
    scores: np.ndarray

    def quantile(self, level: float) -> float:
        """The conformal quantile: the ``ceil((n + 1) level)``-th smallest score (the next
        kept one if thinned); inf when the band has too few rows for ``level``."""
        k = math.ceil((self.n + 1) * level - 1e-9)
        if k > self.n:
            return math.inf
        return float(self.scores[np.searchsorted(self.ranks, k, side="left")])


@dataclass(frozen=True)
class Calibration:
    """Bands of predicted log price (``edges`` between them, increasing) and each band's
    residuals."""

    edges: np.ndarray
    bands: tuple[Band, ...]

    @property
    def n(self) -> int:
        return sum(b.n for b in self.bands)

    def max_level(self) -> float:
        """The highest level every band can give a finite range for."""
        return min(b.n / (b.n + 1) for b in self.bands)

    def half_width(self, pred_log: np.ndarray, level: float) -> np.ndarray:
        """Each row's half-width in log price at ``level`` (its band's quantile)."""
        q = np.array([b.quantile(level) for b in self.bands])
        return q[np.searchsorted(self.edges, pred_log, side="right")]

    def bounds(self, pred_log: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        """The range's two ends in price (``exp`` of log price ± the half-width)."""
        h = self.half_width(pred_log, level)
        return np.exp(pred_log - h), np.exp(pred_log + h)

    def check(self, level: float, what: str = "--interval") -> None:
        """A level the bands can serve, or a one-line error saying the highest one."""
        if not np.isfinite([b.quantile(level) for b in self.bands]).all():
            smallest = min(b.n for b in self.bands)
            raise ValueError(f"{what} {level}: the model's ranges are calibrated on price "
                             f"bands of as few as {smallest} rows, enough for levels up to "
                             f"{math.floor(self.max_level() * 1000) / 1000}; pick a lower one")

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "edges": self.edges.tolist(),
                "bands": [{"n": b.n, "ranks": b.ranks.tolist(), "scores": b.scores.tolist()}
                          for b in self.bands]}

    @classmethod
    def from_json(cls, spec: Any, where: str) -> Calibration:
        """Parse what a file holds, as data: a malformed one is a one-line error."""
        def bad(why: str) -> DataError:
            return DataError(f"{where}: not a valid intervals file ({why}); rebuild the model "
                             "with 'houseprice run --from select'")

        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            raise bad(f"format {spec.get('format') if isinstance(spec, dict) else None!r}, "
                      f"expected {FORMAT}")
        try:
            edges = np.asarray(spec["edges"], dtype=np.float64)
            bands = tuple(
                Band(int(b["n"]), np.asarray(b["ranks"], dtype=np.int64),
                     np.asarray(b["scores"], dtype=np.float64)) for b in spec["bands"])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        if edges.ndim != 1 or len(bands) != len(edges) + 1 or not np.isfinite(edges).all() \
                or (np.diff(edges) < 0).any():
            raise bad("band edges")
        for b in bands:
            if (b.n < 1 or b.ranks.ndim != 1 or b.ranks.shape != b.scores.shape
                    or len(b.ranks) == 0 or b.ranks[-1] != b.n or b.ranks[0] < 1
                    or (np.diff(b.ranks) <= 0).any() or not np.isfinite(b.scores).all()
                    or (b.scores < 0).any() or (np.diff(b.scores) < 0).any()):
                raise bad("a band's residuals")
        return cls(edges, bands)


def _band(scores: np.ndarray) -> Band:
    s = np.sort(np.abs(scores))
    n = len(s)
    ranks = np.unique(np.ceil(np.linspace(1, n, min(n, MAX_SCORES))).astype(np.int64))
    return Band(n, ranks, s[ranks - 1])


def fit(pred_log: np.ndarray, log_y: np.ndarray, max_bands: int = MAX_BANDS,
        min_rows: int = MIN_BAND_ROWS) -> Calibration:
    """Calibrate on out-of-fold predictions and the true log prices (``(n,)`` each)."""
    pred_log = np.asarray(pred_log, dtype=np.float64)
    log_y = np.asarray(log_y, dtype=np.float64)
    if len(pred_log) == 0 or not (np.isfinite(pred_log).all() and np.isfinite(log_y).all()):
        raise ValueError("ranges need finite out-of-fold predictions for at least one row")
    b = int(np.clip(len(pred_log) // min_rows, 1, max_bands))
    edges = np.unique(np.quantile(pred_log, np.arange(1, b) / b))
    band = np.searchsorted(edges, pred_log, side="right")
    residual = log_y - pred_log
    return Calibration(edges, tuple(_band(residual[band == i]) for i in range(len(edges) + 1)))


def oof_coverage(pred_log: np.ndarray, log_y: np.ndarray, fold: np.ndarray,
                 levels: tuple[float, ...] = LEVELS) -> list[dict[str, Any]]:
    """Per level: the share of rows inside their range and the median range width (price
    and share of the predicted price), each fold's rows with ranges calibrated on the other
    folds' rows only."""
    pred_log, log_y, fold = (np.asarray(a) for a in (pred_log, log_y, fold))
    half = {level: np.full(len(pred_log), np.nan) for level in levels}
    for k in np.unique(fold):
        held = fold == k
        cal = fit(pred_log[~held], log_y[~held])
        for level in levels:
            half[level][held] = cal.half_width(pred_log[held], level)
    out = []
    for level in levels:
        h = half[level]
        width = np.exp(pred_log + h) - np.exp(pred_log - h)
        out.append({"level": level,
                    "coverage": float(np.mean(np.abs(log_y - pred_log) <= h)),
                    "median_width": float(np.median(width)),
                    "median_relative_width": float(np.median(width / np.exp(pred_log)))})
    return out


def save(cal: Calibration, coverage: list[dict[str, Any]], out_dir: Path) -> None:
    (out_dir / INTERVALS_JSON).write_text(json.dumps({**cal.to_json(), "coverage": coverage}))


def load(path: Path) -> Calibration | None:
    """The calibration saved beside a model (its ``INTERVALS_JSON``), or None for a model
    from before ranges."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); rebuild the model with "
                        "'houseprice run --from select'") from None
    return Calibration.from_json(spec, str(path))
