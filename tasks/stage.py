"""What every stage shares: content-derived versions, the cache policy keyed on them, and
the helper the flow uses to call a stage.

A stage's version is a hash of (stage name, the stage's code, its versioned parameters, its
upstream versions). Prefect's cache key *is* that version, so caching holds across runs and
processes, never hashes a DataFrame, and changes exactly when the output would.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem, RemoteFileSystem

from tasks import progress
from tasks.frozen import Frozen
from tasks.kinds import CandidateConfig, code_files
from tasks.storage import artifacts
from tasks.storage.artifacts import ArtifactRef, is_complete
from tasks.storage.records import safe
from tasks.storage.store import canonical, open_store, root_key

TASKS_DIR = Path(__file__).resolve().parent

# The source files whose text defines each stage's computation. The download stage's output
# is fixed by the files' SHA-1 hashes alone, so its code is deliberately not part of it. A
# train version also holds its candidate's kind's own files (``code_files``), so editing one
# kind's module retrains that kind only.
_FEATURES = ("data/features.py", "data/settings.py", "data/statistics.py")
_PREDICT_CODE = ("inference/batch.py", "inference/plan.py", "inference/forest.py",
                 "inference/intervals.py",
                 *_FEATURES, "kinds/__init__.py")
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "download": (),
    "preprocess": ("preprocess.py", *_FEATURES, "data/rawcsv.py", "data/foldmaps.py"),
    "tensorize": ("tensorize.py", "preprocess.py", *_FEATURES, "data/rawcsv.py",
                  "data/folds.py", "data/foldmaps.py"),
    "train": ("train.py", "data/folds.py", "data/foldmaps.py", *_FEATURES, "kinds/__init__.py"),
    "select": ("select.py", "inference/checkpoint.py", "data/folds.py", "data/foldmaps.py",
               *_PREDICT_CODE, *code_files()),
    "predict": ("predict.py", *_PREDICT_CODE),
    "score": ("score.py", "data/sources.py", *_PREDICT_CODE),
}
# The libraries whose arithmetic shapes what a stage writes (major.minor): an upgrade gives
# new versions instead of silently reusing artifacts and checkpoints built by the old ones.
STAGE_LIBRARIES: dict[str, tuple[str, ...]] = {
    "download": (),
    "preprocess": ("numpy", "pandas", "pyarrow"),
    "tensorize": ("numpy", "pandas", "pyarrow"),
    "train": ("numpy", "pandas", "pyarrow", "scikit-learn", "torch", "skops"),
    "select": ("numpy", "pandas", "pyarrow", "scikit-learn", "torch", "scipy", "skops"),
    "predict": ("numpy", "pandas", "pyarrow", "numba"),
    "score": ("numpy", "pandas", "pyarrow", "numba"),
}

# Stages whose code is deliberately out of their version carry a format number instead:
# bump it when the stage would write other bytes for the same inputs (download: how several
# files are merged into one).
STAGE_FORMATS: dict[str, int] = {"download": 2}

# Inputs that say where things run, not what is computed.
_UNVERSIONED_INPUTS = frozenset({"root", "force", "chunk_size", "threshold"})


class StageError(RuntimeError):
    """A stage failed; the message starts with the stage's name."""


@functools.cache
def library_version(name: str) -> str:
    """An installed library's major.minor (read from its metadata, not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return ".".join(version(name).split(".")[:2])
    except PackageNotFoundError:
        return "absent"


@functools.cache
def code_version(stage: str, extra: tuple[str, ...] = ()) -> str:
    """Hash of the source files that define ``stage`` (and the ``extra`` ones)."""
    digest = hashlib.sha256(f"format {STAGE_FORMATS.get(stage, 0)}".encode())
    for lib in STAGE_LIBRARIES[stage]:
        digest.update(f"{lib} {library_version(lib)}".encode())
    for name in (*STAGE_CODE[stage], *extra):
        digest.update(name.encode())
        digest.update((TASKS_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


def _stage_code(stage: str, inputs: dict[str, Any]) -> str:
    cand = inputs.get("candidate")
    extra = tuple(cand.code_files) if isinstance(cand, CandidateConfig) else ()
    return code_version(stage, extra)


def _canonical(value: Any) -> Any:
    if isinstance(value, ArtifactRef):
        return {"stage": value.stage, "version": value.version}
    if isinstance(value, Frozen):
        return value.version_params()
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def versioned_inputs(inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a stage's inputs into (parameters, upstream versions) that define its output."""
    params: dict[str, Any] = {}
    upstream: dict[str, Any] = {}
    for name, value in sorted(inputs.items()):
        if name in _UNVERSIONED_INPUTS:
            continue
        if isinstance(value, ArtifactRef) or (
            isinstance(value, list | tuple) and value and isinstance(value[0], ArtifactRef)
        ):
            upstream[name] = _canonical(value)
        else:
            params[name] = _canonical(value)
    return params, upstream


def stage_version(stage: str, inputs: dict[str, Any]) -> str:
    """The content-derived version of ``stage`` run on ``inputs`` (16 hex digits)."""
    params, upstream = versioned_inputs(inputs)
    blob = json.dumps(
        {"stage": stage, "code": _stage_code(stage, inputs), "params": params,
         "upstream": upstream},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageVersionPolicy(CachePolicy):
    """Cache key = the stage's artifact version (no run id, no big objects hashed), plus the
    artifact root: a cached reference names its root, so a moved or copied root must not
    be served references into the old one."""

    def __init__(self, stage: str):
        self.stage = stage

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        version = stage_version(self.stage, inputs)
        return f"houseprice-{self.stage}-{version}-{root_key(inputs['root'])}"


@functools.cache
def results_storage(root: str | Path) -> LocalFileSystem | RemoteFileSystem:
    """Prefect's cache records live beside the artifacts they point to (a storage block saved
    on the API, as Prefect requires, named after the artifact root), so a cache hit on one
    machine is a cache hit on every machine that shares the root. In an object store that is
    Prefect's fsspec-backed ``RemoteFileSystem``: no extra package (prefect-aws's ``S3Bucket``
    would add one and serve S3 only), any fsspec scheme, the same credentials as the
    artifacts. The saved block itself, not its slug, goes to the tasks: a slug is loaded from
    the API by every task run, and the first load imports every installed Prefect collection
    (Dask's: about 1 s)."""
    root = canonical(root)
    path = f"{root}/.prefect-results"
    name = "houseprice-results-" + hashlib.sha256(path.encode()).hexdigest()[:12]
    if open_store(root).remote:
        block = RemoteFileSystem(basepath=path)
    else:
        Path(path).mkdir(parents=True, exist_ok=True)
        block = LocalFileSystem(basepath=path)
    return _saved(block, name)


def _saved(block: LocalFileSystem | RemoteFileSystem, name: str
           ) -> LocalFileSystem | RemoteFileSystem:
    """``block`` as saved on the API under ``name``: the saved one when it holds the same
    settings (a read), else saved now. Saving it again on every run is a write the
    server's SQLite often answers 503 to while the flow run's own writes land, and Prefect's
    client then waits 2 s (or 2 + 4 s) before retrying: most of a warm run."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    want = block.model_dump(mode="json", exclude={"block_type_slug"})
    with get_client(sync_client=True) as client:
        try:
            doc = client.read_block_document_by_name(name, block.get_block_type_slug())
        except ObjectNotFound:
            doc = None
    if doc is not None and all(doc.data.get(k) == v for k, v in want.items()):
        return safe(type(block)._from_block_document(doc))
    block.save(name, overwrite=True)
    return safe(block)


def _for_call(task: Task, root: str, inputs: dict[str, Any], force: bool) -> Task:
    """``task`` configured for one call: results stored under ``root``, and the cache
    refreshed when the artifact it would return is missing or damaged (or ``force``)."""
    ref = ArtifactRef(root=root, stage=task.name,
                      version=stage_version(task.name, inputs))
    return task.with_options(
        result_storage=results_storage(root), refresh_cache=force or not is_complete(ref),
        task_run_name=task_run_name(task.name, inputs),
    )


def task_run_name(stage: str, inputs: dict[str, Any]) -> str:
    """What the dashboard lists a stage's task run as: ``train[lasso]``, ``score[a.csv]``,
    ``select``."""
    item = inputs.get("candidate") or inputs.get("file")
    return f"{stage}[{item.name}]" if isinstance(item, Frozen) else stage


def run_stage(task: Task, root: str, *, force: bool = False, **inputs: Any) -> ArtifactRef:
    """Call a stage task (cached on its version) and return its artifact reference;
    ``force`` recomputes it (and replaces the artifact only once the new one is complete)."""
    extra = {"force": True} if force else {}
    name = task_run_name(task.name, inputs)
    progress.stage_state(name, "Running")
    state = _for_call(task, root, inputs, force)(root=root, **inputs, **extra,
                                                 return_state=True)
    progress.stage_state(name, state.name)  # Completed, Cached, Failed, ...
    return state.result()  # raises what the task raised, as a plain call would


def submit_stage(task: Task, root: str, *, force: bool = False, **inputs: Any):
    """Submit a stage task to the flow's task runner; returns a future of its reference."""
    extra = {"force": True} if force else {}
    return _for_call(task, root, inputs, force).submit(root=root, **inputs, **extra)


def stage_task_options(stage: str) -> dict[str, Any]:
    """Keyword arguments for ``@task`` shared by all stage tasks."""
    return {
        "name": stage,
        "task_run_name": stage,  # no random suffix; run_stage adds the candidate's name
        "cache_policy": StageVersionPolicy(stage),
        "persist_result": True,
        "result_serializer": "json",
    }


def one_line(exc: BaseException) -> str:
    """An exception as a single line: its type when the message is empty."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class failing_as:  # noqa: N801 - used like a function: ``with failing_as("train"):``
    """Re-raise any exception inside the block as a StageError naming ``stage``."""

    def __init__(self, stage: str):
        self.stage = stage

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, StageError) or not isinstance(exc, Exception):
            return False
        raise StageError(f"stage '{self.stage}' failed: {one_line(exc)}") from exc


def build_stage(stage: str, root: str, inputs: dict[str, Any], write,
                force: bool = False) -> ArtifactRef:
    """Build (or reuse, if intact and not ``force``) the artifact of ``stage`` on ``inputs``.

    ``write(out_dir)`` fills a temporary directory and returns manifest metrics; errors come
    out as a StageError naming the stage.
    """
    with failing_as(stage):
        params, upstream = versioned_inputs(inputs)
        try:
            return artifacts.build(
                root, stage, stage_version(stage, inputs), write,
                parameters=params, upstream=upstream, code_version=_stage_code(stage, inputs),
                force=force,
            )
        finally:
            release_freed_memory()


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system. glibc keeps what a stage freed for
    later allocations; with a million rows that was about 0.5 GB of the process's peak that
    no later stage reused. (A lower mmap threshold would do it as well, but made the torch
    training loop's per-step buffers page-fault: 60% slower.)"""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass
