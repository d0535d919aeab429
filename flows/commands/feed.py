"""``houseprice make-feed``: the Kaggle training file as monthly files of sales, the living
data a scheduled run trains on."""

from __future__ import annotations

import argparse
from pathlib import Path


def make_feed(args: argparse.Namespace) -> int:
    from tasks.config import DataConfig
    from tasks.data.feed import make_feed
    from tasks.download import fetch

    data = DataConfig(**{k: v for k, v in (("url", args.data_url), ("cache_dir", args.data_dir))
                         if v})
    train = fetch(data.files["train"], data.url, Path(data.cache_dir), timeout_s=data.timeout_s,
                  retries=data.retries, backoff_s=data.backoff_s)
    written = make_feed(train, Path(args.out_dir), until=args.until, since=args.since)
    first, last = min(written), max(written)
    print(f"houseprice: wrote {len(written)} monthly file(s) {first} .. {last} "
          f"({sum(written.values())} rows) to {args.out_dir}")
    return 0
