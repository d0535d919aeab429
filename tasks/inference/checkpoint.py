"""The checkpoint select writes (``model.pt``): every component's fold members as their kinds
saved them, with the preprocessors, loaded back as ``FittedModel`` (the reference predictor:
each member predicts on its own, as it was scored). Predict uses the compiled plan
(``tasks/inference/plan.py``); this is what the plan is compiled from and checked against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from tasks.data.features import DataError, Preprocessor, TransformReport
from tasks.kinds import CandidateConfig, Member, candidate

# /4: per-fold preprocessors; /3: candidates are kinds (each component's model_config holds
# only its kind's fields, and its members are loaded by the kind).
CHECKPOINT_FORMAT = "houseprice-checkpoint/4"
# Format 3 has no per-fold preprocessors; 4 may (both read the same otherwise).
READABLE_FORMATS = ("houseprice-checkpoint/3", CHECKPOINT_FORMAT)


class FittedModel:
    """A loaded checkpoint: the preprocessor and its components (a single candidate, or a
    weighted blend), each the average of its fold models in log space, or (a ``refit``
    component) one model fitted on all rows. Each component's kind loads its own members.
    With per-fold preprocessing each fold model reads the rows through its own fold's
    preprocessor (as it was trained and scored); a refit one, and drift, the all-rows one."""

    def __init__(self, checkpoint: dict[str, Any], source: str = "the checkpoint"):
        if checkpoint.get("format") not in READABLE_FORMATS:
            raise DataError(f"{source} is a {checkpoint.get('format') or 'pre-format'} "
                            f"checkpoint, this code reads {CHECKPOINT_FORMAT}; rerun select "
                            "to rebuild it ('houseprice run --from select')")
        self.target = checkpoint["target"]
        self.preprocessor = Preprocessor.from_dict(checkpoint["preprocessor"])
        self.metrics = checkpoint["metrics"]
        # (weight, config, members per fold, refit: fitted on all rows)
        self.components: list[tuple[float, CandidateConfig, list[list[Member]], bool]] = []
        # The same members as their kinds saved them (per component, per fold): what each
        # kind's ``inference_form`` compiles.
        self.saved_members: list[list[list[dict[str, Any]]]] = []
        for comp in checkpoint["components"]:
            try:
                spec = candidate(**comp["model_config"])
            except ValidationError as exc:
                raise DataError(f"{source}: component {comp.get('candidate')!r} has a config "
                                f"this code cannot read ({exc.errors()[0]['msg']}); rerun "
                                "select ('houseprice run --from select')") from None
            folds = [[spec.load_member(m, checkpoint["n_features"], self.target)
                      for m in fold["members"]] for fold in comp["folds"]]
            self.components.append((comp["weight"], spec, folds, bool(comp.get("refit"))))
            self.saved_members.append([fold["members"] for fold in comp["folds"]])
        self.fold_preprocessors = [Preprocessor.from_dict(d) for d in
                                   checkpoint.get("fold_preprocessors") or []]
        for p in self.fold_preprocessors:
            p.layout_index(self.preprocessor.feature_names_)  # a fold's features fit the model's
        if self.fold_preprocessors and any(len(folds) != len(self.fold_preprocessors)
                                           for _, _, folds, refit in self.components
                                           if not refit):
            raise DataError(f"{source}: {len(self.fold_preprocessors)} fold preprocessors "
                            "but components with another number of folds; rerun select")

    @classmethod
    def load(cls, path: str | Path) -> FittedModel:
        import torch

        return cls(torch.load(path, map_location="cpu", weights_only=True), str(path))

    def reads_fold_features(self, refit: bool) -> bool:
        """Whether a component's fold models read their own fold's features."""
        return bool(self.fold_preprocessors) and not refit

    def predict_table(self, table) -> tuple[np.ndarray, TransformReport]:
        """``predict_frame`` of an Arrow table (as batch predict reads rows): the reference
        path goes through pandas, as it was trained."""
        import pandas as pd
        import pyarrow as pa

        return self.predict_frame(table.to_pandas(types_mapper=lambda t: pd.StringDtype(
            "pyarrow") if pa.types.is_string(t) else None))

    def predict_frame(self, df: pd.DataFrame) -> tuple[np.ndarray, TransformReport]:
        """Raw rows -> ``(n,) float64`` log price, and the drift report (of the all-rows
        preprocessor). With per-fold preprocessors one fold's matrix at a time, so memory
        holds one ``(n, n_features)`` matrix, not one per fold."""
        X, report = self.preprocessor.transform(df)
        total = np.zeros(len(df))
        for weight, _, folds, refit in self.components:
            if not self.reads_fold_features(refit):
                total += weight * np.mean(
                    [np.mean([m.log_price(X) for m in members], axis=0) for members in folds],
                    axis=0)
        del X
        names = self.preprocessor.feature_names_
        for k, pre in enumerate(self.fold_preprocessors):
            Xk = pre.transform_as(df, names)
            for weight, _, folds, refit in self.components:
                if self.reads_fold_features(refit):
                    total += weight * np.mean([m.log_price(Xk) for m in folds[k]],
                                              axis=0) / len(folds)
        return total, report
