"""A feed to try the living-data loop on: the Kaggle training file as monthly files.

The training rows already carry their sale month (``YrSold``/``MoSold``, 2006-01 to 2010-07),
so ``make_feed`` writes them as ``YYYY-MM.csv`` files, one per month: the shape of a source
that grows by a monthly drop. Rows are written as their original lines, byte for byte, so the
months together hold exactly the training file's rows.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pandas as pd

from tasks.data.features import DataError

MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


def make_feed(train_csv: Path, out_dir: Path, until: str | None = None,
              since: str | None = None) -> dict[str, int]:
    """Write ``out_dir/YYYY-MM.csv`` for every sale month in ``[since, until]``; returns rows
    per month written. A month file that already holds the same bytes is left alone (so a
    source's validators see it unchanged)."""
    for name, value in (("--until", until), ("--since", since)):
        if value is not None and not MONTH.match(value):
            raise DataError(f"{name} {value!r} is not a month; use YYYY-MM, e.g. 2008-12")
    lines = Path(train_csv).read_text().splitlines(keepends=True)
    frame = pd.read_csv(train_csv, usecols=["YrSold", "MoSold"])
    if len(frame) != len(lines) - 1:
        raise DataError(f"{train_csv}: rows span several lines; cannot split it by line")
    months = frame["YrSold"].astype(str) + "-" + frame["MoSold"].map("{:02d}".format)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for month in sorted(months.unique()):
        if (until and month > until) or (since and month < since):
            continue
        rows = [lines[i + 1] for i in (months == month).to_numpy().nonzero()[0]]
        body = lines[0] + "".join(rows)
        path = out_dir / f"{month}.csv"
        if not (path.is_file() and path.read_text() == body):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(body)
            os.replace(tmp, path)
        written[month] = len(rows)
    if not written:
        raise DataError(f"no sales in the months asked for (the data spans "
                        f"{months.min()} to {months.max()})")
    return written
