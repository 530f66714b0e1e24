"""Run by tests/test_distributed.py under torchrun (2 ranks, gloo): each rank holds different cases of
every global batch; writes the GroupDRO q and weights it ends with to OUT/rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from divaware import distributed
from divaware.weighting import make_strategy


def stream(n_steps: int = 6, batch: int = 5) -> tuple[pd.DataFrame, list[tuple[list[str], np.ndarray]]]:
    """A training table with three groups and a seeded stream of global batches with per-case losses."""
    ids = [f"P{i:03d}" for i in range(30)]
    table = pd.DataFrame({"age_group": (["0-40", "41-50", "51-60"] * 10)}, index=pd.Index(ids, name="patient_id"))
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(n_steps):
        chosen = list(rng.choice(ids, size=batch, replace=False))
        losses = rng.uniform(0.1, 2.0, size=batch) + np.array([0.8 if i in ids[::3] else 0.0 for i in chosen])
        steps.append((chosen, losses))
    return table, steps


def main(out: str) -> None:
    ranks, _ = distributed.setup("cpu")
    table, steps = stream()
    strategy = make_strategy("group_dro", attributes=["age_group"], eta=0.5).fit(table)
    for ids, losses in steps:
        start, stop = distributed.rank_slices(len(ids), ranks.world)[ranks.rank]
        # every rank sees only its own cases; the gathered batch is the global one
        all_ids, all_losses, _ = ranks.gather_losses({}, ids[start:stop], losses[start:stop])
        strategy.batch_weights(all_ids, all_losses)
    Path(out, f"rank{ranks.rank}.json").write_text(json.dumps({
        "q": strategy.q.to_dict(), "weights": strategy.weights.to_dict()}))
    ranks.close()


if __name__ == "__main__":
    main(sys.argv[1])
