"""One typed, frozen config tree for the whole pipeline.

Each stage receives only its own part. Fields listed in a model's ``_unversioned`` say *where*
or *how* something runs (paths, URLs, timeouts, device), not *what* it computes, so they are
left out of artifact versions and cache keys.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REGISTRY_PATH = PROJECT_ROOT / "data" / "registry.json"

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    _unversioned: ClassVar[frozenset[str]] = frozenset()

    def version_params(self) -> dict[str, Any]:
        """The fields that determine what a stage computes, as plain JSON."""
        return self.model_dump(mode="json", exclude=set(self._unversioned))


class RemoteFile(_Frozen):
    name: str
    sha1: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]


def _registry_files() -> dict[str, RemoteFile]:
    entry = json.loads(REGISTRY_PATH.read_text())["kaggle_house"]
    return {role: RemoteFile(**spec) for role, spec in entry["files"].items()}


def _default_data_url() -> str:
    return os.environ.get("HOUSEPRICE_DATA_URL") or json.loads(REGISTRY_PATH.read_text())[
        "kaggle_house"
    ]["base_url"]


def _default_data_dir() -> str:
    return os.environ.get("HOUSEPRICE_DATA_DIR") or str(PROJECT_ROOT / "data" / "cache")


def default_artifacts_dir() -> str:
    return os.environ.get("HOUSEPRICE_ARTIFACTS") or str(PROJECT_ROOT / "artifacts")


class DataConfig(_Frozen):
    """Where the raw CSVs come from. Only the files' hashes define the data."""

    _unversioned = frozenset({"url", "cache_dir", "timeout_s", "retries", "backoff_s"})

    url: str = Field(default_factory=_default_data_url, description="base URL, file:// or dir")
    cache_dir: str = Field(default_factory=_default_data_dir)
    files: dict[Literal["train", "test"], RemoteFile] = Field(default_factory=_registry_files)
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    backoff_s: Annotated[float, Field(ge=0)] = 1.0


class PreprocessConfig(_Frozen):
    """Standardize numerics, one-hot categoricals (with a missing-value indicator)."""

    fit_on: Literal["train", "train+test"] = Field(
        "train",
        description="rows the statistics and categories are fitted on; 'train+test' is the "
        "book's exact (leaky) recipe",
    )


class CandidateConfig(_Frozen):
    """One candidate model and how it is optimized."""

    name: Name
    kind: Literal["linear", "mlp"] = "mlp"
    hidden: tuple[Annotated[int, Field(gt=0)], ...] = (256,)
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    init: Literal["default", "xavier", "normal"] = "default"
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    epochs: Annotated[int, Field(gt=0, le=100_000)] = 100
    batch_size: Annotated[int, Field(gt=0)] = 64

    @model_validator(mode="after")
    def _mlp_needs_layers(self) -> CandidateConfig:
        if self.kind == "mlp" and not self.hidden:
            raise ValueError("an mlp candidate needs at least one hidden layer size")
        return self


class TrainConfig(_Frozen):
    """K-fold cross-validation settings shared by all candidates."""

    _unversioned = frozenset({"device"})

    n_splits: Annotated[int, Field(ge=2, le=100)] = 5
    seed: int = 0
    fold_scheme: Literal["shuffled", "contiguous"] = Field(
        "shuffled", description="'contiguous' reproduces the book's unshuffled folds"
    )
    target: Literal["log", "raw"] = Field(
        "log", description="regress log(SalePrice) or, as the book does, the raw price"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PredictConfig(_Frozen):
    _unversioned = frozenset({"chunk_size"})

    chunk_size: Annotated[int, Field(gt=0)] = 50_000


def default_candidates() -> tuple[CandidateConfig, ...]:
    """The book's linear baseline and two regularized MLPs with different activations."""
    return (
        CandidateConfig(
            name="linear", kind="linear", hidden=(), lr=0.01, weight_decay=1e-3, epochs=100
        ),
        CandidateConfig(
            name="mlp-relu", hidden=(256,), activation="relu", dropout=0.3,
            lr=1e-3, weight_decay=1e-2, epochs=100,
        ),
        CandidateConfig(
            name="mlp-tanh", hidden=(128, 64), activation="tanh", dropout=0.1, init="xavier",
            lr=1e-3, weight_decay=1e-3, epochs=100,
        ),
    )


class PipelineConfig(_Frozen):
    """Everything a run needs; the flow's one parameter (editable in the dashboard)."""

    _unversioned = frozenset({"artifacts_dir", "submission"})

    artifacts_dir: str = Field(default_factory=default_artifacts_dir)
    submission: str | None = Field(None, description="also copy the Kaggle CSV to this path")
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    candidates: tuple[CandidateConfig, ...] = Field(default_factory=default_candidates)
    predict: PredictConfig = Field(default_factory=PredictConfig)

    @field_validator("candidates")
    @classmethod
    def _unique_names(cls, value: tuple[CandidateConfig, ...]) -> tuple[CandidateConfig, ...]:
        if not value:
            raise ValueError("at least one candidate is needed")
        names = [c.name for c in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"candidate names must be unique; repeated: {', '.join(dupes)}")
        return value

    def with_epochs(self, epochs: int) -> PipelineConfig:
        """A copy with every candidate trained for ``epochs`` epochs."""
        data = self.model_dump()
        for cand in data["candidates"]:
            cand["epochs"] = epochs
        return PipelineConfig.model_validate(data)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file into a plain dict (validated by the caller)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        return tomllib.loads(text)
    if path.suffix.lower() == ".json":
        return json.loads(text)
    raise ValueError(f"config file {path} must end in .toml or .json")
