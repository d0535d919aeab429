"""The base of every config class: frozen, no unknown fields, and a version of what it computes.

Fields listed in a model's ``_unversioned`` say *where* or *how* something runs (paths, URLs,
timeouts, device), not *what* it computes, so they are left out of artifact versions and cache
keys (at every depth: a nested config drops its own ``_unversioned`` fields too).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    _unversioned: ClassVar[frozenset[str]] = frozenset()

    def version_params(self) -> dict[str, Any]:
        """The fields that determine what a stage computes, as plain JSON."""
        out = {}
        for field in type(self).model_fields:
            if field not in self._unversioned:
                out[field] = _versioned(getattr(self, field))
        return out


def _versioned(value: Any) -> Any:
    if isinstance(value, Frozen):
        return value.version_params()
    if isinstance(value, list | tuple):
        return [_versioned(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _versioned(v) for k, v in value.items()}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value
