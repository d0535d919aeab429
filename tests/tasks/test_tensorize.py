"""Tensorize's refusals: folds other than train's, names that are not unique, rows without
the columns the outlier rule reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
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


FULL_DISK = """
import json, resource, signal, sys
from tasks.config import FoldSpec
from tasks.storage.artifacts import ArtifactRef
from tasks.tensorize import tensorize_task

root, raw, pre, folds = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
# Every file this process writes stops at 1 MiB, as on a disk with 1 MiB left: the write
# fails with an OSError (SIGXFSZ ignored), as writing to a full disk does.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    tensorize_task.fn(ArtifactRef(root=root, stage="download", version=raw),
                      ArtifactRef(root=root, stage="preprocess", version=pre), root,
                      FoldSpec(**folds))
except Exception as exc:
    print(exc)
    sys.exit(1)
"""


def test_a_full_disk_fails_tensorize_in_one_line_with_nothing_half_written(trained, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from tasks.storage.artifacts import is_complete
    from tasks.tensorize import tensorize_task

    cfg, result = trained
    versions = lineage(resolve(cfg.artifacts_dir, "select", result["model_version"]))
    root = tmp_path / "arts"
    for stage in ("download", "preprocess"):
        shutil.copytree(f"{cfg.artifacts_dir}/{stage}/{versions[stage][0]}",
                        root / stage / versions[stage][0], symlinks=True)
    raw, pre = (ArtifactRef(root=str(root), stage=s, version=versions[s][0])
                for s in ("download", "preprocess"))
    folds = cfg.train.folds
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(root), raw.version, pre.version,
         folds.model_dump_json()], capture_output=True, text=True, timeout=300,
        cwd=os.getcwd(), env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert "\n" not in line
    assert line.startswith("stage 'tensorize' failed: ") and "File too large" in line
    # Nothing half-written: no version, no temporary folder; the inputs are whole.
    assert [p.name for p in (root / "tensorize").iterdir()] == []
    assert is_complete(raw) and is_complete(pre)
    # With room again, the same stage builds.
    ref = tensorize_task.fn(raw, pre, str(root), folds)
    assert is_complete(ref) and (root / "tensorize" / ref.version / "fold_base.npy").is_file()


def test_batches_of_rows_write_what_one_batch_writes(trained, tmp_path):
    """Tensorize reads, encodes and writes a batch of rows at a time; read in batches of
    4 KiB (about ten rows), the matrix and the fold base are those of one batch, and the
    fold maps the same to float rounding (each fold's sums add up in another order)."""
    import json

    from tasks.tensorize import read_matrix, tensorize

    cfg, result = trained
    versions = lineage(resolve(cfg.artifacts_dir, "select", result["model_version"]))
    raw, pre = (ArtifactRef(root=cfg.artifacts_dir, stage=s, version=versions[s][0])
                for s in ("download", "preprocess"))
    written = {}
    for block in (16 << 20, 4096):
        out = tmp_path / str(block)
        out.mkdir()
        tensorize(raw, pre, out, cfg.train.folds, block_bytes=block)
        written[block] = out
    one, many = written[16 << 20], written[4096]
    a, b = read_matrix(one / "train.parquet"), read_matrix(many / "train.parquet")
    assert len(a.ids) > 100 and pq.ParquetFile(many / "train.parquet").num_row_groups > 100
    assert pq.ParquetFile(one / "train.parquet").num_row_groups == 1
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.meta == b.meta
    np.testing.assert_array_equal(np.load(one / "fold_base.npy"), np.load(many / "fold_base.npy"))
    maps = [json.loads((d / "fold_maps.json").read_text()) for d in (one, many)]
    assert maps[0].keys() == maps[1].keys()
    for key, value in maps[0].items():
        if key in ("scale", "shift"):
            np.testing.assert_allclose(value, maps[1][key], rtol=1e-9, atol=1e-12)
        else:
            assert value == maps[1][key], key
