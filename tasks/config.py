"""One typed, frozen config tree for the whole pipeline.

Each stage receives only its own part, and a stage's version holds only the fields it reads.
Fields listed in a model's ``_unversioned`` say *where* or *how* something runs (paths, URLs,
timeouts, device), not *what* it computes, so they are left out of artifact versions and cache
keys. Candidates are a discriminated union on ``kind`` (``tasks/kinds``): each kind has only
its own fields.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tasks.data.folds import FoldSpec  # noqa: F401 - the tree's sections, all from here
from tasks.data.settings import PreprocessConfig
from tasks.frozen import Frozen as _Frozen
from tasks.kinds import KINDS, Candidate, CandidateConfig, candidate, check_fields
from tasks.kinds.settings import TrainConfig
from tasks.layout import PROJECT_ROOT, STAGES, Stage, default_artifacts_dir  # noqa: F401

REGISTRY_PATH = PROJECT_ROOT / "data" / "registry.json"


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


Sha1 = Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]


def data_version(files) -> str:
    """The version of a set of data files: the hash of their sorted (name, SHA-1) list, so
    the same bytes give the same version and anything new a new one."""
    return short_hash(sorted([str(n), str(h)] for n, h in files))[:16]


class DataConfig(_Frozen):
    """Where the raw rows come from. Only the files' hashes define the data (the download
    stage's version is taken from what the sources hold when it runs)."""

    _unversioned = frozenset({"url", "cache_dir", "timeout_s", "retries", "backoff_s", "train",
                              "test", "sha1", "files"})

    url: str = Field(default_factory=_default_data_url,
                     description="base URL, file:// or dir of the Kaggle pair (the default)")
    train: str | None = Field(
        None, description="training rows: a CSV/Parquet file, a directory or a glob of them "
        "(http(s)://, file:// or a path), concatenated in name order; default: the Kaggle "
        "training file under url")
    test: str | None = Field(
        None, description="rows to predict, as train; default: the Kaggle test file under url")
    sha1: dict[str, Sha1] = Field(
        default_factory=dict, description="optional pinned SHA-1 per file name of train/test "
        "sources, verified at download")
    on_duplicate: Literal["error", "last"] = Field(
        "error", description="the same Id in two training files: an error, or the later file "
        "(in name order) wins, for corrections")
    cache_dir: str = Field(default_factory=_default_data_dir)
    files: dict[Literal["train", "test"], RemoteFile] = Field(default_factory=_registry_files)
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    backoff_s: Annotated[float, Field(ge=0)] = 1.0


class SelectConfig(_Frozen):
    """How the model is chosen from the trained candidates (read by select only, so changing
    it retrains nothing)."""

    on: Literal["clean", "all"] = Field(
        "all", description="rows the out-of-fold log RMSE that picks the model is taken on: "
        "'all' uses every row (what a user meets), 'clean' leaves out the two outliers",
    )
    final: Literal["auto", "ensemble", "mixed", "refit"] = Field(
        "auto", description="each component's final model. 'ensemble': its fold models "
        "averaged, each through its own fold's preprocessor; 'refit': one model fitted on "
        "all rows (the book's train_and_pred); 'mixed': linear kinds keep the ensemble (it "
        "collapses into one linear model, free to predict), other kinds are refitted; "
        "'auto': 'mixed' when its estimated out-of-fold score is within max_loss of the "
        "ensemble's, else 'ensemble'")
    max_loss: Annotated[float, Field(ge=0)] = Field(
        0.001, description="out-of-fold log RMSE (all rows) 'auto' may give up for speed")
    min_rows_per_s: Annotated[float, Field(gt=0)] | None = Field(
        None, description="leave out candidates, and blend components, whose final model "
        "predicts slower than this (rows/s measured at select time on this machine)")


class PromoteConfig(_Frozen):
    """When a run's model replaces the production model (the gate is not cached)."""

    min_improvement: Annotated[float, Field(ge=0)] = Field(
        0.0, description="log RMSE the challenger must gain over production, on rows "
        "neither was fitted on, to be promoted")


class PredictConfig(_Frozen):
    _unversioned = frozenset({"chunk_size"})

    chunk_size: Annotated[int, Field(gt=0)] = 50_000


class ScoreConfig(_Frozen):
    """The scoring flow: every file in an inbox, predicted by a model (production by
    default). Each (model version, file) is its own cached artifact."""

    _unversioned = frozenset({"artifacts_dir", "inbox", "model", "cache_dir", "timeout_s",
                              "retries", "backoff_s", "chunk_size", "drift_threshold"})

    artifacts_dir: str = Field(default_factory=default_artifacts_dir)
    inbox: str = Field(description="files to score: a CSV/Parquet file, a directory or a glob "
                       "(http(s)://, file:// or a path)")
    model: str = Field("production", description="select version, 'production' or 'latest'")
    drift_threshold: Annotated[float, Field(ge=0, le=1)] = Field(
        0.05, description="share of a file's rows with an out-of-range numeric or an unseen "
        "category above which a houseprice.drift.detected event is emitted")
    interval: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        0.9, description="coverage level of the SalePrice_lo, SalePrice_hi range written "
        "beside each price (None: prices only)")
    cache_dir: str = Field(default_factory=_default_data_dir)
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    backoff_s: Annotated[float, Field(ge=0)] = 1.0
    chunk_size: Annotated[int, Field(gt=0)] = 50_000


def default_candidates() -> tuple[CandidateConfig, ...]:
    """The book's linear model (trained with weight decay) and the regressors a user expects
    beside it: lasso and histogram gradient boosting. Ridge and the MLPs come from
    ``default_search``."""
    return (
        candidate(name="linear", kind="linear", lr=0.01, weight_decay=1e-3, epochs=100),
        candidate(name="lasso", kind="lasso", alpha=5e-4, max_iter=5000),
        # 100 trees at 0.2: the blend scores as with 200 at 0.12, in half the time to train
        # and to predict.
        candidate(name="hgb", kind="hgb", learning_rate=0.2, max_iter=100, max_leaf_nodes=15,
                  min_samples_leaf=10),
    )


class SearchSpace(_Frozen):
    """A declared search space turned into candidates: every combination of ``grid``
    (``mode='grid'``) or ``n_samples`` seeded random combinations (``mode='random'``), each
    applied to ``base``; candidate ``i`` is named ``{base.name}-{i:02d}``. The grid may name
    only fields of the base candidate's kind."""

    base: Candidate
    grid: dict[str, tuple[Any, ...]]
    mode: Literal["grid", "random"] = "grid"
    n_samples: Annotated[int, Field(ge=1, le=1000)] = 8
    seed: int = 0

    @field_validator("grid")
    @classmethod
    def _some_values(cls, value: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
        fixed = sorted({"name", "kind"} & set(value))
        if fixed:
            raise ValueError(f"cannot search over {', '.join(fixed)}: declare one search "
                             "space per kind")
        empty = sorted(k for k, v in value.items() if not v)
        if empty:
            raise ValueError(f"no values to search for {', '.join(empty)}")
        return value

    @model_validator(mode="after")
    def _valid_candidates(self) -> SearchSpace:
        check_fields(self.base.kind, sorted(self.grid), f"search over '{self.base.name}'")
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
            type(self.base).model_validate(
                {**base, **dict(zip(keys, combo, strict=True)), "name": f"{self.base.name}-{i:02d}"}
            )
            for i, combo in enumerate(combos)
        )


def default_search() -> tuple[SearchSpace, ...]:
    """Ridge's penalty and whether it fits the two outliers, a seeded random search of
    24 MLPs (width and depth, dropout, weight decay, learning rate; one seed per fold: the 3
    repeats of the folds already give each row 3 models' predictions; each keeps the mean of
    its last 8 epochs' weights, which lowers its variance as more seeds would, at no cost:
    docs/accuracy.md), and a grid of 8 wide-and-deep MLPs (each on its fold's lasso's
    residuals). MLPs of one shape train as one stacked model, with successive halving: at a
    quarter and at half of the steps the worse half of a stack stops (docs/kinds.md); the
    cold default run's time is in docs/benchmarks.md."""
    return (
        # Whether to fit the two outliers, searched: scored on all rows, as everything.
        SearchSpace(base=candidate(name="ridge", kind="ridge"),
                    grid={"alpha": (3.0, 10.0, 30.0), "exclude_outliers": (False, True)}),
        SearchSpace(
            # 2,400 steps: every epoch up to about 12,800 training rows per fold; on more rows
            # the same number of steps, so a bigger file does not multiply the search's cost.
            base=candidate(name="mlp", kind="mlp", hidden=(32,), lr=3e-3, batch_size=128,
                           epochs=24, seeds=1, max_steps=2_400, average_last=8, halving=2),
            grid={"hidden": ((32,), (48,), (32, 16)), "dropout": (0.0, 0.1, 0.3),
                  "weight_decay": (1e-3, 3e-3, 1e-2, 3e-2), "lr": (1e-3, 3e-3, 1e-2)},
            mode="random", n_samples=24,
        ),
        # Wide and deep, fitted in stages: each fold's lasso first, then the network on what
        # it leaves (``wide_alpha``). The best single model of the default run
        # (docs/accuracy.md); at a third of the plain MLPs' learning rate, which wins there.
        SearchSpace(
            base=candidate(name="wide", kind="mlp", hidden=(48,), lr=1e-3, batch_size=128,
                           epochs=24, seeds=1, max_steps=2_400, average_last=8,
                           wide_alpha=5e-4, halving=2),
            grid={"hidden": ((32,), (48,)), "dropout": (0.0, 0.1),
                  "weight_decay": (1e-2, 3e-2)},
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
    candidates: tuple[Candidate, ...] = Field(default_factory=default_candidates)
    search: tuple[SearchSpace, ...] = Field(default_factory=default_search)
    select: SelectConfig = Field(default_factory=SelectConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)

    def tensorize_inputs(self) -> dict[str, Any]:
        """What tensorize needs beside its upstream artifacts: the folds train will cut
        (when each fold gets its own preprocessor) and the rows preprocessors fit on."""
        return {"folds": self.train.folds if self.preprocess.per_fold else None,
                "fit_on": self.preprocess.fit_on}

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        """Fields that moved between sections get an error saying where they went."""
        if isinstance(data, dict) and isinstance(data.get("train"), dict) and (
                "select_on" in data["train"]):
            raise PydanticCustomError(
                "moved_field", "train.select_on moved to select.on (it is read only by "
                "select; changing it no longer retrains): write [select] on = \"{v}\"",
                {"v": str(data["train"]["select_on"])})
        return data

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
        """A copy with every epoch-trained candidate (listed or searched) trained ``epochs``
        epochs, averaging the same share of them as before (``average_last``)."""
        data = self.model_dump()
        for cand in [*data["candidates"], *(s["base"] for s in data["search"])]:
            if "epochs" in KINDS[cand["kind"]].model_fields:
                if cand.get("average_last"):
                    cand["average_last"] = round(cand["average_last"] * epochs / cand["epochs"])
                cand["epochs"] = epochs
        for space in data["search"]:
            space["grid"].pop("epochs", None)
        return PipelineConfig.model_validate(data)


def short_hash(value: Any) -> str:
    """8 hex digits naming ``value`` (plain JSON) by content."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_name(config: PipelineConfig, data: str | None = None) -> str:
    """A flow run's name that reads well in a list of runs: the training data's version and
    the config's short hash (what is computed). Before the sources are listed, the data
    version is known only for the pinned Kaggle default; else the source is shown."""
    if data is None and config.data.train is None:
        pinned = config.data.files["train"]
        data = data_version([(pinned.name, pinned.sha1)])[:8]
    shown = data[:8] if data else Path(config.data.train.rstrip("/")).name[:24]
    return f"data {shown} · config {short_hash(config.version_params())}"


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
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text)
        if path.suffix.lower() == ".json":
            return json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid {path.suffix[1:].upper()}: "
                         f"{exc}; fix that line") from None
    raise ValueError(f"config file {path} must end in .toml or .json")
