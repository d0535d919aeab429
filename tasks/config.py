"""One typed, frozen config tree for the whole pipeline.

Each stage receives only its own part. Fields listed in a model's ``_unversioned`` say *where*
or *how* something runs (paths, URLs, timeouts, device), not *what* it computes, so they are
left out of artifact versions and cache keys.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REGISTRY_PATH = PROJECT_ROOT / "data" / "registry.json"

# The pipeline's stages, in order (the flow's ``from_stage`` parameter and ``--from``).
Stage = Literal["download", "preprocess", "tensorize", "train", "select", "predict"]
STAGES: tuple[str, ...] = get_args(Stage)

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
    """Standardize numerics, one-hot categoricals (with a missing-value indicator), and the
    feature switches. Everything is fitted on the training rows only (unless ``fit_on``)."""

    fit_on: Literal["train", "train+test"] = Field(
        "train",
        description="rows the statistics and categories are fitted on; 'train+test' is the "
        "book's exact (leaky) recipe",
    )
    log1p_skewed: bool = Field(
        True, description="log1p numeric features whose training skew exceeds the threshold"
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


TORCH_KINDS = ("linear", "mlp")
SKLEARN_KINDS = ("ridge", "lasso", "hgb")


class CandidateConfig(_Frozen):
    """One candidate model and how it is optimized.

    Torch kinds (``linear``, ``mlp``) use the network and optimizer fields; ``ridge`` and
    ``lasso`` use ``alpha``; ``hgb`` (scikit-learn's HistGradientBoostingRegressor) uses
    ``lr`` as its learning rate, ``max_iter`` trees, ``max_leaf_nodes``, ``min_samples_leaf``
    and ``weight_decay`` as its L2 regularization.
    """

    name: Name
    kind: Literal["linear", "mlp", "ridge", "lasso", "hgb"] = "mlp"
    hidden: tuple[Annotated[int, Field(gt=0)], ...] = (256,)
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    init: Literal["default", "xavier", "normal"] = "default"
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    epochs: Annotated[int, Field(gt=0, le=100_000)] = 100
    batch_size: Annotated[int, Field(gt=0)] = 64
    seeds: Annotated[int, Field(ge=1, le=32)] = Field(
        1, description="torch: train this many seeds per fold and average them (one candidate)"
    )
    clip_grad_norm: Annotated[float, Field(gt=0)] | None = Field(
        None, description="torch: clip each step's gradient norm to this value"
    )
    alpha: Annotated[float, Field(gt=0)] = 1.0
    max_iter: Annotated[int, Field(gt=0, le=100_000)] = 500
    max_leaf_nodes: Annotated[int, Field(ge=2)] = 15
    min_samples_leaf: Annotated[int, Field(ge=1)] = 20

    @property
    def is_torch(self) -> bool:
        return self.kind in TORCH_KINDS

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
    exclude_outliers: bool = Field(
        True, description="leave De Cock's two huge partial sales (GrLivArea > 4000, "
        "SalePrice < 300000) out of fitting; they are still predicted and scored",
    )
    select_on: Literal["clean", "all"] = Field(
        "clean", description="rows the out-of-fold log RMSE that picks the model is taken on: "
        "'clean' leaves out those two outliers, 'all' uses every row",
    )


class PredictConfig(_Frozen):
    _unversioned = frozenset({"chunk_size"})

    chunk_size: Annotated[int, Field(gt=0)] = 50_000


def default_candidates() -> tuple[CandidateConfig, ...]:
    """The book's linear model (trained with weight decay) and the regressors a user expects
    beside it: lasso and histogram gradient boosting. Ridge and the MLPs come from
    ``default_search``."""
    return (
        CandidateConfig(
            name="linear", kind="linear", hidden=(), lr=0.01, weight_decay=1e-3, epochs=100
        ),
        CandidateConfig(name="lasso", kind="lasso", hidden=(), alpha=5e-4, max_iter=5000),
        CandidateConfig(name="hgb", kind="hgb", hidden=(), lr=0.05, max_iter=500,
                        max_leaf_nodes=15, min_samples_leaf=10),
    )


class SearchSpace(_Frozen):
    """A declared search space turned into candidates: every combination of ``grid``
    (``mode='grid'``) or ``n_samples`` seeded random combinations (``mode='random'``), each
    applied to ``base``; candidate ``i`` is named ``{base.name}-{i:02d}``."""

    base: CandidateConfig
    grid: dict[str, tuple[Any, ...]]
    mode: Literal["grid", "random"] = "grid"
    n_samples: Annotated[int, Field(ge=1, le=1000)] = 8
    seed: int = 0

    @field_validator("grid")
    @classmethod
    def _known_fields(cls, value: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
        unknown = sorted(set(value) - set(CandidateConfig.model_fields) | ({"name"} & set(value)))
        if unknown:
            raise ValueError(f"cannot search over {', '.join(unknown)}: not a candidate field")
        empty = sorted(k for k, v in value.items() if not v)
        if empty:
            raise ValueError(f"no values to search for {', '.join(empty)}")
        return value

    @model_validator(mode="after")
    def _valid_candidates(self) -> SearchSpace:
        try:
            self.candidates()
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"search value for {field} is invalid: {err['msg']}") from None
        return self

    def candidates(self) -> tuple[CandidateConfig, ...]:
        keys = sorted(self.grid)
        combos = list(itertools.product(*(self.grid[k] for k in keys)))
        if self.mode == "random":
            rng = random.Random(self.seed)
            combos = rng.sample(combos, min(self.n_samples, len(combos)))
        base = self.base.model_dump()
        return tuple(
            CandidateConfig.model_validate(
                {**base, **dict(zip(keys, combo, strict=True)), "name": f"{self.base.name}-{i:02d}"}
            )
            for i, combo in enumerate(combos)
        )


def default_search() -> tuple[SearchSpace, ...]:
    """A small grid, sized so a default run takes a couple of minutes on 2 CPU cores: ridge's
    penalty, and MLPs over weight decay and activation (3 seeds averaged per fold)."""
    return (
        SearchSpace(base=CandidateConfig(name="ridge", kind="ridge", hidden=()),
                    grid={"alpha": (3.0, 10.0, 30.0)}),
        SearchSpace(
            base=CandidateConfig(name="mlp", hidden=(256,), dropout=0.3, lr=1e-3,
                                 batch_size=128, epochs=100, seeds=3),
            grid={"weight_decay": (3e-3, 1e-2), "activation": ("relu", "tanh")},
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
    search: tuple[SearchSpace, ...] = Field(default_factory=default_search)
    predict: PredictConfig = Field(default_factory=PredictConfig)

    @field_validator("candidates")
    @classmethod
    def _unique_listed(cls, value: tuple[CandidateConfig, ...]) -> tuple[CandidateConfig, ...]:
        _check_unique([c.name for c in value])
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> PipelineConfig:
        names = [c.name for c in self.all_candidates()]
        if not names:
            raise ValueError("at least one candidate is needed (in candidates or search)")
        _check_unique(names)
        return self

    def all_candidates(self) -> tuple[CandidateConfig, ...]:
        """The listed candidates, then those the search spaces declare."""
        return self.candidates + tuple(c for s in self.search for c in s.candidates())

    def with_epochs(self, epochs: int) -> PipelineConfig:
        """A copy with every torch candidate (listed or searched) trained ``epochs`` epochs."""
        data = self.model_dump()
        for cand in [*data["candidates"], *(s["base"] for s in data["search"])]:
            if cand["kind"] in TORCH_KINDS:
                cand["epochs"] = epochs
        for space in data["search"]:
            space["grid"].pop("epochs", None)
        return PipelineConfig.model_validate(data)


def _check_unique(names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"candidate names must be unique; repeated: {', '.join(dupes)}")


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
