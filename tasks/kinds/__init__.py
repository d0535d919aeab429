"""The model kinds, by name: each family one module behind the contract in
``tasks/kinds/base.py``.

To add a kind, write its config class (its own fields, ``kind: Literal["name"]``,
``cross_validate`` and ``load_member``, or a ``make_estimator`` on ``SklearnCandidate``) in a
new module, import it here and add one line to ``KINDS`` (docs/kinds.md shows one). It
predicts through the plan's generic runtime until it defines ``inference_form``.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field, TypeAdapter
from pydantic_core import PydanticCustomError

from tasks.kinds.base import CandidateConfig, Member
from tasks.kinds.boosting import GBRConfig, HGBConfig
from tasks.kinds.kernels import KernelRidgeConfig, SVRConfig
from tasks.kinds.linear_models import ElasticNetConfig, LassoConfig, RidgeConfig
from tasks.kinds.torch_net import LinearConfig, MLPConfig

KINDS: dict[str, type[CandidateConfig]] = {
    "linear": LinearConfig,
    "mlp": MLPConfig,
    "ridge": RidgeConfig,
    "lasso": LassoConfig,
    "enet": ElasticNetConfig,
    "svr": SVRConfig,
    "krr": KernelRidgeConfig,
    "hgb": HGBConfig,
    "gbr": GBRConfig,
}


def own_fields(kind: str) -> list[str]:
    """The fields a candidate of ``kind`` may set, ``name`` and ``kind`` first."""
    return list(KINDS[kind].model_fields)


def check_fields(kind: str, fields: list[str], what: str) -> None:
    """Raise a one-line error naming ``what`` (a candidate or search space) when one of
    ``fields`` does not belong to ``kind``, saying where a renamed field went."""
    cls = KINDS[kind]
    for field in fields:
        if field in cls.model_fields:
            continue
        if field in cls.renamed:
            raise PydanticCustomError(
                "candidate_field", "{what}: field '{field}' of kind {kind} is now called "
                "'{new}'", {"what": what, "field": field, "kind": kind,
                            "new": cls.renamed[field]})
        allowed = [f for f in own_fields(kind) if f not in ("name", "kind")]
        close = difflib.get_close_matches(field, allowed, n=1)
        owners = [k for k, c in KINDS.items() if field in c.model_fields]
        hint = (f"did you mean '{close[0]}'?" if close else
                f"it is a field of {', '.join(owners)}" if owners else "no kind has it")
        raise PydanticCustomError(
            "candidate_field", "{what}: field '{field}' does not belong to kind {kind} "
            "({hint}); its fields: {allowed}",
            {"what": what, "field": field, "kind": kind, "hint": hint,
             "allowed": ", ".join(allowed)})


def _check_candidate(value: Any) -> Any:
    """Before the union validates a candidate: a missing or unknown kind, or a field of
    another kind, gets an error naming the candidate (not pydantic's ``Extra inputs``)."""
    if not isinstance(value, dict):
        return value
    what = f"candidate '{value.get('name', '?')}'"
    kind = value.get("kind")
    if kind is None:
        raise PydanticCustomError(
            "candidate_kind", "{what} has no kind; add kind = one of {kinds}",
            {"what": what, "kinds": ", ".join(KINDS)})
    if kind not in KINDS:
        raise PydanticCustomError(
            "candidate_kind", "{what}: unknown kind '{kind}'; kinds: {kinds}",
            {"what": what, "kind": str(kind), "kinds": ", ".join(KINDS)})
    check_fields(kind, list(value), what)
    return value


# A candidate: one of the kinds, chosen by its ``kind`` field.
Candidate = Annotated[
    Union[tuple(KINDS.values())],  # noqa: UP007 - built from the registry at runtime
    Field(discriminator="kind"),
    BeforeValidator(_check_candidate),
]

_ADAPTER: TypeAdapter[CandidateConfig] = TypeAdapter(Candidate)


def candidate(**fields: Any) -> CandidateConfig:
    """A validated candidate of the kind ``fields['kind']`` names."""
    return _ADAPTER.validate_python(fields)


def code_files() -> tuple[str, ...]:
    """Every kind's source files (what select and predict load members with)."""
    return tuple(sorted({f for cls in KINDS.values() for f in cls.code_files}))


__all__ = ["KINDS", "Candidate", "CandidateConfig", "Member", "candidate", "check_fields",
           "code_files", "own_fields"]
