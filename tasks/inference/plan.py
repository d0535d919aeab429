"""The compiled inference plan: the selected model as plain arrays, predicted with NumPy (and
numba for trees), without torch, scikit-learn or pickle.

Select compiles the checkpoint's components into the plan (``plan.json`` + ``plan.npz``, read
with ``allow_pickle=False``); predict reads only the plan. What compiling does:

- **Linear members collapse into one linear function of the raw columns.** The average of K
  linear models is one linear model, and a fold's standardization is affine, so every linear
  member of every component, each behind its own fold's preprocessor, adds up to: per numeric
  column ``a*v + b*log1p(v) + m`` where the value is present (0 where it is missing, as the
  imputed feature is 0), per categorical column a lookup by category, and an intercept. No
  one-hot matrix is built for them.
- **Every other member** is in the form its kind gives (``CandidateConfig.inference_form``):
  one of the runtimes here (stacked nets, a forest, kernels), or ``generic``, the saved member
  loaded by its kind at predict time. Nonlinear members read their own fold's feature
  matrix, built once per preprocessor from one shared encoding of the chunk; MLPs of one
  shape are one stacked matrix product per layer; every tree of every member is walked by
  one compiled loop.

The plan predicts what the checkpoint predicts (a test holds them to 1e-6): the one difference
is that a collapsed linear member's clamp at a log price of 0 (a price of 1) is not applied
member by member, which matters only for a prediction below one dollar.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.data.features import DataError, Encoded, Preprocessor, TransformReport, column_map
from tasks.kinds.base import Linear, clamped_log_price, join

PLAN_FORMAT = "houseprice-plan/1"
PLAN_JSON, PLAN_ARRAYS = "plan.json", "plan.npz"


@dataclass(eq=False)  # hashed by identity: a plan's forest is built once (_forest)
class Term:
    """One nonlinear fold model in the plan: ``kind`` names its runtime (net | trees | svr |
    krr | generic), reading the features of preprocessor ``pre`` (0: all rows, k + 1: fold
    k), its log price weighted by ``scale``."""

    kind: str
    pre: int
    scale: float
    params: dict[str, Any]
    arrays: dict[str, np.ndarray]


@dataclass
class Plan:
    target: str
    preprocessors: list[Preprocessor]  # the all-rows one, then one per fold (if any)
    describe: str = "model"  # what was selected: a candidate's name or 'blend'
    intercept: float = 0.0
    # numeric column -> [a, b, m]: a*v + b*log1p(max(v, 0)) + m where v is present
    linear_num: dict[str, np.ndarray] = field(default_factory=dict)
    # categorical column -> contribution per code (categories, missing, unseen = 0)
    linear_cat: dict[str, np.ndarray] = field(default_factory=dict)
    # interaction "num@cat" -> per code of cat [slope, offset]: adds slope * num where num
    # is present, -offset where it is missing (the one-column-per-category interaction
    # features, collapsed: one lookup instead of a column per category)
    linear_inter: dict[str, np.ndarray] = field(default_factory=dict)
    members: list[Term] = field(default_factory=list)
    # Where the networks' matrix products run: None = NumPy on the CPU (no torch imported);
    # a torch device ("cuda", "cuda:1", or "cpu" to check the torch path) = torch there.
    # Trees stay on the CPU (numba), linear parts are lookups either way.
    torch_device: str | None = None

    @property
    def preprocessor(self) -> Preprocessor:
        return self.preprocessors[0]

    def signature(self) -> tuple:
        """What a prediction costs, as a key: plans with equal keys do the same work."""
        members = sorted((m.kind, m.pre > 0, tuple(a.shape for a in m.arrays.values()))
                         for m in self.members)
        return (bool(self.linear_num or self.linear_cat or self.linear_inter),
                len(self.preprocessors),
                tuple(members))

    # --- predicting -------------------------------------------------------------------

    def predict_frame(self, df: pd.DataFrame) -> tuple[np.ndarray, TransformReport]:
        """Raw rows -> ``(n,) float64`` log price, and the drift report."""
        return self._predict(self.preprocessor.encode(df))

    def predict_table(self, table: pa.Table) -> tuple[np.ndarray, TransformReport]:
        """``predict_frame`` of rows as Arrow read them (batch predict): no pandas frame."""
        return self._predict(self.preprocessor.encode_table(table))

    def _predict(self, enc: Encoded) -> tuple[np.ndarray, TransformReport]:
        total = np.full(enc.n, self.intercept)
        for col, (a, b, m) in self.linear_num.items():
            v = enc.numeric[col]
            present = ~np.isnan(v)
            part = np.full(enc.n, m)
            if a:
                part += a * v
            if b:
                part += b * np.log1p(np.clip(v, 0.0, None))
            total += np.where(present, part, 0.0)
        for col, table in self.linear_cat.items():
            total += table[enc.codes[col]]
        for spec, table in self.linear_inter.items():
            num, cat = spec.split("@")
            v, code = enc.numeric[num], enc.codes[cat]
            total += np.where(np.isnan(v), -table[code, 1], table[code, 0] * v)
        if self.members:
            cats = self.preprocessor.categories_
            names = self.preprocessor.feature_names_
            for pre, members in self._by_preprocessor().items():
                X = self.preprocessors[pre].features(enc, cats, names)
                total += _predict_members(members, X, self.target, self.torch_device)
        return total, enc.report

    def _by_preprocessor(self) -> dict[int, list[Term]]:
        groups: dict[int, list[Term]] = {}
        for m in self.members:
            groups.setdefault(m.pre, []).append(m)
        return groups

    # --- saving -----------------------------------------------------------------------

    def save(self, out_dir: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        num_cols = list(self.linear_num)
        if num_cols:
            arrays["linear_num"] = np.array([self.linear_num[c] for c in num_cols])
        cat_cols = list(self.linear_cat)
        for i, c in enumerate(cat_cols):
            arrays[f"linear_cat_{i}"] = self.linear_cat[c]
        inter = list(self.linear_inter)
        for i, c in enumerate(inter):
            arrays[f"linear_inter_{i}"] = self.linear_inter[c]
        members = []
        for i, m in enumerate(self.members):
            for name, arr in m.arrays.items():
                arrays[f"m{i}_{name}"] = arr
            members.append({"kind": m.kind, "pre": m.pre, "scale": m.scale,
                            "params": m.params, "arrays": list(m.arrays)})
        spec = {"format": PLAN_FORMAT, "target": self.target, "describe": self.describe,
                "preprocessors": [p.to_dict() for p in self.preprocessors],
                "intercept": self.intercept, "linear_num": num_cols,
                "linear_cat": cat_cols, "linear_inter": inter, "members": members}
        np.savez(out_dir / PLAN_ARRAYS, **arrays)
        (out_dir / PLAN_JSON).write_text(json.dumps(spec))

    @classmethod
    def load(cls, directory: str | Path) -> Plan:
        """A saved plan (plain JSON and arrays: nothing in it can run code)."""
        directory = Path(directory)
        try:
            spec = json.loads((directory / PLAN_JSON).read_text())
            with np.load(directory / PLAN_ARRAYS, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except ValueError as exc:  # an object array (pickle) or a malformed file
            raise DataError(f"{directory / PLAN_ARRAYS}: not a plain-array plan ({exc}); "
                            "rerun select ('houseprice run --from select')") from None
        if spec.get("format") != PLAN_FORMAT:
            raise DataError(f"{directory / PLAN_JSON} is a {spec.get('format')!r} plan, this "
                            f"code reads {PLAN_FORMAT}; rerun select")
        plan = cls(target=spec["target"],
                   preprocessors=[Preprocessor.from_dict(d) for d in spec["preprocessors"]],
                   describe=spec["describe"], intercept=spec["intercept"])
        if spec["linear_num"]:
            plan.linear_num = dict(zip(spec["linear_num"], arrays["linear_num"], strict=True))
        plan.linear_cat = {c: arrays[f"linear_cat_{i}"]
                           for i, c in enumerate(spec["linear_cat"])}
        plan.linear_inter = {c: arrays[f"linear_inter_{i}"]
                             for i, c in enumerate(spec.get("linear_inter", []))}
        for i, m in enumerate(spec["members"]):
            if m["kind"] not in _PREDICTORS:
                raise DataError(f"{directory / PLAN_JSON}: unknown member kind {m['kind']!r}")
            plan.members.append(Term(m["kind"], m["pre"], m["scale"], m["params"],
                                       {a: arrays[f"m{i}_{a}"] for a in m["arrays"]}))
        return plan


# --- compiling ------------------------------------------------------------------------


def compile_plan(model: Any) -> Plan:
    """A loaded checkpoint (``tasks.predict.FittedModel``) as a plan."""
    pres = [model.preprocessor, *model.fold_preprocessors]
    label = (model.metrics or {}).get("candidate") or "+".join(
        spec.name for _, spec, _, _ in model.components)
    plan = Plan(target=model.target, preprocessors=pres, describe=label)
    names = model.preprocessor.feature_names_
    at = {n: j for j, n in enumerate(names)}
    for (weight, spec, folds, refit), saved in zip(model.components, model.saved_members,
                                                   strict=True):
        for k, members in enumerate(folds):
            pre = k + 1 if model.reads_fold_features(refit) else 0
            for member, raw in zip(members, saved[k], strict=True):
                scale = weight / len(folds) / len(members)
                form = spec.inference_form(raw, member, len(names), model.target)
                if isinstance(form, Linear):
                    _collapse(plan, form.w, form.b, pres[pre], scale, at)
                elif form.kind in _PREDICTORS:
                    plan.members.append(Term(form.kind, pre, scale, form.params, form.arrays))
                else:
                    raise DataError(f"kind {spec.kind}: inference form {form.kind!r} is not "
                                    f"one of the plan's runtimes ({', '.join(_PREDICTORS)})")
    return plan


def _collapse(plan: Plan, w: np.ndarray, b: float, pre: Preprocessor, scale: float,
              at: dict[str, int]) -> None:
    """Add ``scale * (w . features + b)``, features through ``pre``, to the linear part."""
    plan.intercept += scale * b
    cats = plan.preprocessor.categories_
    inter = set()
    for spec, _, cat, code, name in pre.interaction_levels(cats):
        # w * (x - mean) / std with x = num on this category's rows, else 0: a constant on
        # every row, and the slope (or, where num is missing, minus the constant) on its own.
        inter.add(name)
        mean, std = pre.numeric_[name]
        wj = scale * w[at[name]]
        table = plan.linear_inter.setdefault(spec, np.zeros((len(cats[cat]) + 2, 2)))
        plan.intercept -= wj * mean / std
        table[code] += (wj / std, -wj * mean / std)
    for col, (mean, std) in pre.numeric_.items():
        if col in inter:
            continue
        wj = scale * w[at[col]]
        coef = plan.linear_num.setdefault(col, np.zeros(3))
        coef[1 if col in pre.log1p_ else 0] += wj / std
        coef[2] -= wj * mean / std
    for col, own in pre.categories_.items():
        where = column_map(col, cats[col], own, at)
        table = plan.linear_cat.setdefault(col, np.zeros(len(where)))
        hit = where >= 0
        table[hit] += scale * w[where[hit]]


# --- members' predictions -------------------------------------------------------------


def _predict_members(members: list[Term], X: np.ndarray, target: str,
                     torch_device: str | None = None) -> np.ndarray:
    total = np.zeros(len(X))
    trees = [m for m in members if m.kind == "trees"]
    if trees:
        total += _predict_forests(trees, X, target)
    nets: dict[tuple, list[Term]] = {}
    for m in members:
        if m.kind == "net":
            shape = tuple(m.arrays[f"W{i}"].shape for i in range(m.params["layers"]))
            nets.setdefault((shape, m.params["activation"], m.params.get("float64", False)),
                            []).append(m)
        elif m.kind == "generic":
            total += m.scale * _predict_generic(m, X, target)
        elif m.kind != "trees":
            total += m.scale * clamped_log_price(_PREDICTORS[m.kind](m, X), target)
    for group in nets.values():
        total += _predict_nets(group, X, target, torch_device)
    return total


def _wide(group: list[Term], X: np.ndarray) -> np.ndarray | None:
    """``(M, n) float64``: each net's wide part, ``X·w + b`` (a net without one: 0); None
    when no net of the group has one."""
    if not any("wide_w" in m.arrays for m in group):
        return None
    W = np.stack([m.arrays.get("wide_w", np.zeros(X.shape[1])) for m in group], axis=1)
    b = np.array([m.params.get("wide_b", 0.0) for m in group])
    return (X.astype(np.float64) @ W.astype(np.float64) + b).T


_ACTIVATIONS = {"relu": lambda h: np.maximum(h, 0, out=h),
                "tanh": lambda h: np.tanh(h, out=h),
                "sigmoid": lambda h: np.reciprocal(1 + np.exp(-h, out=h), out=h)}


def _predict_nets(group: list[Term], X: np.ndarray, target: str,
                  torch_device: str | None = None) -> np.ndarray:
    """Nets of one shape as one stacked model: the first layers side by side in one matrix
    product, the later ones batched (in NumPy, or in torch on ``torch_device``)."""
    dtype = np.float64 if group[0].params.get("float64") else np.float32
    forward = _forward if torch_device is None else functools.partial(
        _forward_torch, device=torch_device)
    out = forward(group, X.astype(dtype, copy=False))  # (M, n)
    wide = _wide(group, X)
    total = np.zeros(len(X))
    for j, m in enumerate(group):
        # As the network's own log_price: a raw-price target reads the output as the price.
        y = (out[j] * dtype(m.params["y_std"]) + dtype(m.params["y_mean"])
             if target == "log" else out[j])
        if wide is not None:  # the wide part, added in float64 before the clamp
            y = y.astype(np.float64) + wide[j]
        total += m.scale * clamped_log_price(y, target)
    return total


def _forward(group: list[Term], X: np.ndarray) -> np.ndarray:
    """The stacked nets' outputs ``(M, n)`` in NumPy."""
    act = _ACTIVATIONS[group[0].params["activation"]]
    (W0, b0), *later = _stacked(tuple(group))
    h = X @ W0 + b0  # (n, M * width)
    h = h.reshape(len(X), len(group), -1).transpose(1, 0, 2)  # (M, n, width)
    for W, b in later:
        h = np.matmul(act(np.ascontiguousarray(h)), W) + b[:, None, :]
    return h[..., 0]


def _forward_torch(group: list[Term], X: np.ndarray, device: str) -> np.ndarray:
    """``_forward`` in torch on ``device`` (a GPU): the same stacked weights, moved there
    once per plan; the outputs come back for the same post-processing."""
    import torch

    acts = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
    act = acts[group[0].params["activation"]]
    (W0, b0), *later = _stacked_on(tuple(group), device)
    with torch.inference_mode():
        h = torch.from_numpy(X).to(device) @ W0 + b0
        h = h.reshape(len(X), len(group), -1).transpose(0, 1)  # (M, n, width)
        for W, b in later:
            h = torch.bmm(act(h), W) + b[:, None, :]
        return h[..., 0].cpu().numpy()


@functools.lru_cache(maxsize=32)
def _stacked_on(group: tuple[Term, ...], device: str) -> list[tuple[Any, Any]]:
    import torch

    return [(torch.from_numpy(W).to(device), torch.from_numpy(b).to(device))
            for W, b in _stacked(group)]


def check_device(device: str) -> str | None:
    """``--device`` of predict as ``Plan.torch_device``: 'cpu' runs NumPy (no torch), 'cuda'
    (or 'cuda:N') torch there; one line when there is no such device."""
    if device == "cpu":
        return None
    if not device.startswith("cuda"):
        raise ValueError(f"unknown device '{device}': use cpu or cuda")
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' requested but CUDA is not available here; "
                           "use --device cpu")
    return device


@functools.lru_cache(maxsize=32)
def _stacked(group: tuple[Term, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """A group's weights, stacked once per plan (not per chunk): the first layers side by
    side ``(d, M * width)``, the later ones batched ``(M, width, width')``."""
    dtype = np.float64 if group[0].params.get("float64") else np.float32
    layers = [(np.concatenate([m.arrays["W0"] for m in group], axis=1).astype(dtype),
               np.concatenate([m.arrays["b0"] for m in group]).astype(dtype))]
    for i in range(1, group[0].params["layers"]):
        layers.append((np.stack([m.arrays[f"W{i}"] for m in group]).astype(dtype),
                       np.stack([m.arrays[f"b{i}"] for m in group]).astype(dtype)))
    return layers


def _predict_svr(m: Term, X: np.ndarray) -> np.ndarray:
    X64 = X.astype(np.float64)
    sv = m.arrays["sv"]
    d2 = (X64 ** 2).sum(1)[:, None] + (sv ** 2).sum(1)[None, :] - 2 * X64 @ sv.T
    return np.exp(-m.params["gamma"] * np.maximum(d2, 0.0)) @ m.arrays["coef"] \
        + m.params["intercept"]


def _predict_krr(m: Term, X: np.ndarray) -> np.ndarray:
    # As scikit-learn's polynomial_kernel computes it, in the inputs' own precision.
    K = X @ m.arrays["X_fit"].T
    K *= m.params["gamma"]
    K += m.params["coef0"]
    K **= m.params["degree"]
    return K @ m.arrays["dual"]


@functools.lru_cache(maxsize=64)
def _generic_member(m: Term, target: str) -> Any:
    """A ``generic`` term's member, loaded once per plan by its kind: the config is validated
    as one of the registered kinds (data, not a class name to import), and a skops member
    loads only trusted types, as it does from the checkpoint."""
    from tasks.kinds import candidate

    spec = candidate(**m.params["config"])
    saved = {}
    for key, how in m.params["fields"].items():
        arr = m.arrays[key]
        if how == "bytes":
            saved[key] = arr.tobytes()
        elif how == "tensor":
            import torch

            saved[key] = torch.from_numpy(np.array(arr))
        else:
            saved[key] = arr
    return spec.load_member(saved, int(m.params["n_features"]), target)


def _predict_generic(m: Term, X: np.ndarray, target: str) -> np.ndarray:
    """Already a clamped log price (the kind's own ``log_price``)."""
    return _generic_member(m, target).log_price(X)


_PREDICTORS = {"svr": _predict_svr, "krr": _predict_krr, "net": None, "trees": None,
               "generic": None}


def _predict_forests(members: list[Term], X: np.ndarray, target: str) -> np.ndarray:
    """Every tree of every member in one compiled pass over the rows."""
    from tasks.inference.forest import walk

    forest = _forest(tuple(members))
    out = np.zeros((len(members), len(X)))
    walk(np.ascontiguousarray(X, dtype=np.float32), *forest, out)
    total = np.zeros(len(X))
    for j, m in enumerate(members):
        total += m.scale * clamped_log_price(out[j] + m.params["base"], target)
    return total


@functools.lru_cache(maxsize=8)
def _forest(members: tuple[Term, ...]) -> tuple[np.ndarray, ...]:
    """The members' trees as one forest (built once per plan, not per chunk): children made
    global, ``roots`` where each tree starts, ``owner`` its member. Thresholds become the
    largest float32 not above them: for a float32 feature ``x <= t`` holds exactly when it
    holds for the float64 ``t``, and the comparison stays in float32."""
    cat = join([m.arrays for m in members])
    owner = np.concatenate([np.full(len(m.arrays["roots"]), j, np.int64)
                            for j, m in enumerate(members)])
    thr = cat["threshold"].astype(np.float32)
    above = thr.astype(np.float64) > cat["threshold"]
    thr[above] = np.nextafter(thr[above], np.float32(-np.inf))
    return (cat["feature"], thr, cat["left"], cat["right"], cat["value"], cat["missing_left"],
            cat["roots"], owner)


TIMING_ROWS = 8192


def rows_per_s(plan: Plan, frame: pd.DataFrame, rows: int = TIMING_ROWS) -> float:
    """Measured prediction speed: ``frame``'s rows repeated to ``rows``, predicted once to
    warm up, then timed (best of 3)."""
    reps = -(-rows // len(frame))
    big = pd.concat([frame] * reps, ignore_index=True).iloc[:rows]
    plan.predict_frame(big.iloc[:64])
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        plan.predict_frame(big)
        best = min(best, time.perf_counter() - t0)
    return rows / best
