"""The cross-validation settings every kind is given (``[train]``), and the device a run
resolves to (torch imported only to resolve it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from tasks.data.folds import FoldSpec
from tasks.frozen import Frozen

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` as the torch device a run trains on; ``cuda`` without
    CUDA fails in one line."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available; use auto or cpu")
    return torch.device(device)


class TrainConfig(Frozen):
    """K-fold cross-validation settings shared by all candidates."""

    _unversioned = frozenset({"device"})

    def version_params(self) -> dict[str, Any]:
        """The device a run resolves to is part of what it computes (batch order and dropout
        masks come from device generators, so a CUDA model is not the CPU model): ``auto``
        and ``cpu`` on a machine without CUDA share a version, and ``cuda`` there fails
        here, before anything runs, instead of returning the cached CPU model."""
        return {**super().version_params(), "device": resolve_device(self.device).type}

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
        False, description="leave De Cock's two huge partial sales (GrLivArea > 4000, "
        "SalePrice < 300000) out of fitting; they are still predicted and scored. Off by "
        "default: a test set holds such sales too, and a model fitted without them "
        "extrapolates wildly for the next very large house",
    )
    repeats: Annotated[int, Field(ge=1, le=20)] = Field(
        3, description="repeated K-fold: cut the folds this many times (seeds seed, seed+1, "
        "...), so each row gets one out-of-fold prediction per repeat; scores are taken over "
        "all of them (choices 0.001 apart are then not coin flips) and their spread over "
        "repeats is reported. The final model is the ensemble of all repeats x folds models",
    )

    @model_validator(mode="after")
    def _repeats_need_shuffled_folds(self) -> TrainConfig:
        if self.repeats > 1 and self.fold_scheme != "shuffled":
            raise ValueError("train.repeats > 1 needs fold_scheme = 'shuffled' (contiguous "
                             "folds are the same every repeat); set repeats = 1")
        return self

    @property
    def folds(self) -> FoldSpec:
        return FoldSpec(n_splits=self.n_splits, seed=self.seed, fold_scheme=self.fold_scheme,
                        repeats=self.repeats)
