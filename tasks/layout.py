"""The stage names and default places every command needs, apart from the config models:
``houseprice predict`` starts without importing those (a tenth of its start-up)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# The pipeline's stages, in order (the flow's ``from_stage`` parameter and ``--from``).
Stage = Literal["download", "preprocess", "tensorize", "train", "select", "predict"]
STAGES: tuple[str, ...] = get_args(Stage)


def default_artifacts_dir() -> str:
    return os.environ.get("HOUSEPRICE_ARTIFACTS") or str(PROJECT_ROOT / "artifacts")
