"""The scoring flow in process against the session's Prefect API: a drifting file raises
one event per model and file, however often it is scored again."""

from __future__ import annotations

import shutil
import time

import pandas as pd

from tasks.score import DRIFT_EVENT
from tests.conftest import TEST_CSV, TRAIN_CSV, without_ranges


def _drift_events(sha1: str, settle_s: float = 3.0) -> list:
    """The drift events about one file, once every event this process emitted has been
    sent and the server has had time to store it."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    flt = EventFilter(event=EventNameFilter(name=[DRIFT_EVENT]),
                      resource=EventResourceFilter(id=[f"houseprice.inbox-file.{sha1}"]))
    deadline, seen, since = time.monotonic() + 30, None, time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(filter=flt, limit=50).events
            if len(events) != seen:  # wait until the count holds still for settle_s
                seen, since = len(events), time.monotonic()
            if (events and time.monotonic() - since >= settle_s) or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def test_a_drifting_file_scored_again_raises_its_event_once(trained, tmp_path):
    from flows.inbox import house_price_score
    from tasks.config import ScoreConfig
    from tasks.download import sha1_file

    cfg, result = trained
    root = tmp_path / "artifacts"  # a copy: its cache records are removed below
    shutil.copytree(cfg.artifacts_dir, root, symlinks=True)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    listings = pd.read_csv(TRAIN_CSV).drop(columns="SalePrice").head(40)
    listings["GrLivArea"] *= 10  # every row far out of the training range
    listings.to_csv(inbox / "far.csv", index=False)
    sha1 = sha1_file(inbox / "far.csv")
    score = ScoreConfig(inbox=str(inbox), model=result["model_version"],
                        artifacts_dir=str(root), cache_dir=str(tmp_path / "cache"),
                        drift_threshold=0.3)

    first = house_price_score(score)
    assert first["drifting"] == ["far.csv"] and first["scored"] == ["far.csv"]
    house_price_score(score)  # Cached: the task does not run
    # Without its cache records the task runs again, finds its artifact whole and must not
    # raise the event a second time.
    shutil.rmtree(root / ".prefect-results")
    house_price_score(score)
    events = _drift_events(sha1)
    assert len(events) == 1, [e.occurred for e in events]
    assert events[0].payload["file"] == "far.csv" and events[0].payload["rows"] == 40
    assert events[0].payload["share"] > 0.3 and events[0].payload["model"] == score.model


def test_scored_files_carry_calibrated_ranges_csv_and_parquet(trained, tmp_path):
    from flows.inbox import house_price_score
    from tasks.config import ScoreConfig

    cfg, result = trained
    root = tmp_path / "artifacts"  # a copy: a model without ranges is made from it below
    shutil.copytree(cfg.artifacts_dir, root, symlinks=True)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    listings = pd.read_csv(TEST_CSV).head(60)
    listings.to_csv(inbox / "a.csv", index=False)
    listings.to_parquet(inbox / "b.parquet")

    def scored(**fields) -> dict[str, pd.DataFrame]:
        score = ScoreConfig(inbox=str(inbox), model=result["model_version"],
                            artifacts_dir=str(root), cache_dir=str(tmp_path / "cache"),
                            **fields)
        out = house_price_score(score)
        return {name: pd.read_csv(path) for name, path in out["predictions"].items()}

    by_file = scored()  # the default level, 0.9
    assert set(by_file) == {"a.csv", "b.parquet"}
    for frame in by_file.values():
        assert list(frame.columns) == ["Id", "SalePrice", "SalePrice_lo", "SalePrice_hi"]
        assert len(frame) == 60
        assert ((frame["SalePrice_lo"] < frame["SalePrice"])
                & (frame["SalePrice"] < frame["SalePrice_hi"])).all()
    pd.testing.assert_frame_equal(by_file["a.csv"], by_file["b.parquet"], rtol=1e-9)
    wider = scored(interval=0.95)["a.csv"]
    assert (wider["SalePrice_hi"] > by_file["a.csv"]["SalePrice_hi"]).all()
    # A production model from before ranges still scores every file, without them.
    without_ranges(root, result["model_version"])
    for frame in scored(interval=0.8).values():
        assert list(frame.columns) == ["Id", "SalePrice"] and len(frame) == 60
