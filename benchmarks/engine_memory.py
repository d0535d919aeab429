"""Memory of the torch engine alone: ``train_stacked`` on N synthetic rows of 64 features,
15 models (3 repeats x 5 folds, a linear net, one stream each), the step budget of
``configs/fast.toml``; or, with C, C MLP candidates of one stack (hidden 48, each its own
learning rate; 15 x C models, as a group of the default search). Prints the peak RSS above
what the inputs hold, per row.

    python benchmarks/engine_memory.py [N] [C]   (default 400,000 rows, the linear net)
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tasks.config import candidate  # noqa: E402
from tasks.kinds.engine import train_stacked  # noqa: E402


def main(n: int, c: int) -> None:
    torch.manual_seed(0)
    X = torch.randn(n, 64)
    y = torch.exp(12 + 0.1 * X[:, 0] + 0.05 * torch.randn(n))
    train, valid = [], []
    for r in range(3):
        fold = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(r))
        for k in range(5):
            train.append(fold != k)
            valid.append(fold == k)
    train_mask, valid_mask = torch.stack(train), torch.stack(valid)
    if c:
        spec = [candidate(name=f"mlp-{i}", kind="mlp", hidden=[48], lr=1e-3 * (i + 1),
                          weight_decay=1e-2, epochs=24, batch_size=128, max_steps=2400)
                for i in range(c) for _ in range(15)]
        train_mask, valid_mask = train_mask.repeat(c, 1), valid_mask.repeat(c, 1)
    else:
        spec = candidate(name="linear", kind="linear", lr=0.01, weight_decay=1e-3, epochs=10,
                         batch_size=256, max_steps=2400)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    res = train_stacked(X, y, train_mask, valid_mask, spec, "log", list(range(15)) * max(c, 1))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{n:,} rows: {time.perf_counter() - start:.1f} s, peak {peak / 1024:.0f} MiB, "
          f"{(peak - base) * 1024 / n:.0f} bytes a row above the inputs, mean valid log RMSE "
          f"{float(res.curves['valid_log_rmse'][:, -1].mean()):.5f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 400_000,
         int(sys.argv[2]) if len(sys.argv) > 2 else 0)
