"""Data-parallel training on CPU with gloo: N ranks must train the run one process trains.

Each torchrun launch starts 2 processes (about a minute on a busy 2-core machine), so the launches are few:
a 2-rank divaware run against one process, a 2-rank GroupDRO epoch resumed in one process, and the GroupDRO
q of a stream of batches spread over 2 ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from ddp_groupdro_worker import stream
from test_train import tiny_config

import divaware.train as T
from divaware import distributed as dist_mod
from divaware.weighting import make_strategy

TESTS = Path(__file__).resolve().parent


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def train_on_ranks(config: T.TrainConfig, tmp: Path, *extra: str) -> Path:
    cfg = tmp / f"{Path(config.out_dir).name}.yaml"
    config.to_yaml(cfg)
    torchrun(["-m", "divaware", "train", "--config", str(cfg), *extra], cwd=tmp)
    return Path(config.out_dir)


def ddp_config(root: Path, out: Path, **overrides: object) -> T.TrainConfig:
    # no augmentation: random transforms draw from per-rank streams, so only then are the runs the same
    return tiny_config(root, out, epochs=2, augment=False, **overrides)


def assert_same_training(one: Path, many: Path) -> None:
    a, b = pd.read_csv(one / "metrics.csv"), pd.read_csv(many / "metrics.csv")
    assert len(a) == len(b) == 2
    for col in ("loss", "loss_mean", "val_dice", "val_worst_group_dice", "selection", "weight_min", "weight_max"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-5, atol=1e-6, err_msg=col)
    wa, wb = pd.read_csv(one / "weights_history.csv"), pd.read_csv(many / "weights_history.csv")
    assert wa[["refresh", "epoch", "patient_id"]].equals(wb[["refresh", "epoch", "patient_id"]])
    np.testing.assert_allclose(wb["weight"], wa["weight"], rtol=1e-5, atol=1e-6)
    va, vb = pd.read_csv(one / "val_scores.csv"), pd.read_csv(many / "val_scores.csv")
    assert va["patient_id"].tolist() == vb["patient_id"].tolist()  # every validation case once, same order
    np.testing.assert_allclose(vb["dice"], va["dice"], atol=1e-6)


def test_global_batches_cover_every_case_once_and_split_over_ranks() -> None:
    batches = dist_mod.global_batches(23, 4, seed=7)
    assert sorted(i for b in batches for i in b) == list(range(23)) and [len(b) for b in batches][-1] == 3
    assert batches == dist_mod.global_batches(23, 4, seed=7) != dist_mod.global_batches(23, 4, seed=8)
    assert dist_mod.rank_slices(5, 2) == [(0, 3), (3, 5)]
    assert dist_mod.rank_slices(1, 2) == [(0, 1), (1, 1)]  # rank 1 holds a placeholder step


def test_two_ranks_train_the_single_process_run(synthetic_root: Path, tmp_path: Path) -> None:
    one = T.train(ddp_config(synthetic_root, tmp_path / "one"))
    many = train_on_ranks(ddp_config(synthetic_root, tmp_path / "two"), tmp_path)
    assert (pd.read_csv(one / "weights_history.csv")["weight"] != 1).any(), "the refresh must change weights"
    assert_same_training(one, many)
    assert yaml.safe_load((many / "config.yaml").read_text())["batch_size"] == 4  # the global batch


def test_group_dro_on_two_ranks_resumed_in_one_process(synthetic_root: Path, tmp_path: Path) -> None:
    one = T.train(ddp_config(synthetic_root, tmp_path / "one", strategy="group_dro", strategy_params={"eta": 0.5}))
    many = train_on_ranks(ddp_config(synthetic_root, tmp_path / "two", strategy="group_dro",
                                     strategy_params={"eta": 0.5}), tmp_path, "--epochs", "1")
    assert len(pd.read_csv(many / "metrics.csv")) == 1
    T.train(ddp_config(synthetic_root, many, strategy="group_dro", strategy_params={"eta": 0.5}), resume=True)
    assert_same_training(one, many)
    qa = torch.load(one / "last.pt", weights_only=False)["strategy"]
    qb = torch.load(many / "last.pt", weights_only=False)["strategy"]
    np.testing.assert_allclose(np.exp(qb["extra"]["log_q"]), np.exp(qa["extra"]["log_q"]), rtol=1e-6)


def test_group_dro_q_is_identical_on_every_rank(tmp_path: Path) -> None:
    torchrun([str(TESTS / "ddp_groupdro_worker.py"), str(tmp_path)], cwd=tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    table, steps = stream()
    ref = make_strategy("group_dro", attributes=["age_group"], eta=0.5).fit(table)
    for ids, losses in steps:
        ref.batch_weights(ids, losses)
    assert r0["q"] == pytest.approx(ref.q.to_dict(), rel=1e-12)
    assert max(r0["q"].values()) > 1.2 / 3  # q moved towards the high-loss group: the test can see a change


def test_fewer_validation_cases_than_ranks(synthetic_root: Path, tmp_path: Path) -> None:
    """One validation case on two ranks: rank 1 validates nothing and must not crash (e.g. 30 cases on 8 GPUs)."""
    config = tiny_config(synthetic_root, tmp_path / "two", epochs=1, augment=False, strategy="erm", strategy_params={},
                         val_fraction=0.03, min_val_cases=0)
    many = train_on_ranks(config, tmp_path)
    val = pd.read_csv(many / "val_scores.csv")
    assert len(set(val["patient_id"])) == 1  # fewer validation cases than ranks
    assert np.isfinite(pd.read_csv(many / "metrics.csv")["val_dice"]).all()


def test_empty_validation_share_gives_an_empty_frame() -> None:
    frame = T.validate(torch.nn.Identity(), [], torch.device("cpu"), 16, None, 0.5, False, "dice")
    assert frame.empty and frame.index.name == "patient_id" and list(frame.columns) == ["dice", "score"]


def test_every_rank_draws_its_own_dropout_stream() -> None:
    """Rank 0 (and so a one-process run) keeps its stream; other ranks get their own, replayable on resume."""
    draws = {}
    for rank in (0, 1, 2):
        torch.manual_seed(123)
        dist_mod.seed_rank(rank, seed=5, epoch=3)
        draws[rank] = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(draws[0], torch.rand(4))  # rank 0 untouched: identical to a run without ranks
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[1], draws[2])
    torch.manual_seed(999)
    dist_mod.seed_rank(1, seed=5, epoch=3)
    assert torch.equal(torch.rand(4), draws[1])  # a function of (seed, epoch, rank) only
