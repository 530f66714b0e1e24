"""The training engine on a tiny synthetic cohort: config, split, strategies, resume, NaN, run folders."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import divaware.train as T
from divaware import data as D
from divaware.cohort import Cohort
from divaware.engine import Callback, SegmentationTask, ValidationResult
from divaware.weighting import STRATEGIES, make_strategy

TIME_COLUMNS = ["time_s", "train_time_s", "val_time_s"]


def tiny_config(root: Path, out: Path, **overrides: Any) -> T.TrainConfig:
    """A CPU-second configuration: volumes resampled to 5 mm (about 23 x 23 x 20 voxels), a small network,
    few epochs, refreshes from the first epoch on."""
    values: dict[str, Any] = {
        "data_root": str(root), "out_dir": str(out), "spacing": [5.0, 5.0, 5.0],
        "channels": [8, 16, 32], "strides": [2, 2],
        "num_res_units": 1, "epochs": 1, "batch_size": 4, "val_fraction": 0.25, "warmup_epochs": 1,
        "update_every": 1, "strategy": "divaware", "scheduler": "constant", "progress": False,
        # no false-discovery control: these tests exercise the machinery, and need weights that move on a
        # 20-case validation split after one epoch, where nothing is statistically divergent
        "strategy_params": {"min_support": 0.1, "t_min": 0.0, "fdr": None}, "cache": "memory",
        # one thread: tests share small machines, where spinning OpenMP threads slow CPU training 10x
        "cpu_threads": 1,
    }
    values.update(overrides)
    return T.TrainConfig(**values)


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def _same_model(a: Path, b: Path) -> bool:
    sa, sb = _load(a)["model"], _load(b)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------------
# config and split
# ------------------------------------------------------------------------------------------------------


def test_config_yaml_round_trip_and_documentation(tmp_path: Path) -> None:
    cfg = T.TrainConfig(phases=(0, 1), lr="3e-4", channels=(4, 8, 16), strides=(2, 2), epochs=7,
                        strategy_params={"tau": 0.1})
    assert cfg.lr == 3e-4 and cfg.phases == [0, 1]
    text = cfg.to_yaml(tmp_path / "c.yaml")
    back = T.TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert back == cfg
    docs = T.TrainConfig.field_docs()
    assert all(docs[name] for name in docs), "every field must be documented"
    for name in docs:
        assert f"# {docs[name]}\n{name}:" in text
    assert cfg.run_dir() == Path("runs/divaware_seed0")


def test_shipped_default_config_is_the_dataclass_default() -> None:
    shipped = Path(__file__).resolve().parents[1] / "configs" / "train_default.yaml"
    assert T.TrainConfig.from_yaml(shipped) == T.TrainConfig()


@pytest.mark.parametrize(
    ("values", "match"),
    [({"alpha": 1.5}, "alpha"), ({"strategy": "fairness"}, "strategy"), ({"model": "vnet"}, "unknown model"),
     ({"loss": "tversky"}, "loss"), ({"phases": [0, 2], "subtraction": True}, "phases 0 and 1"),
     ({"val_fraction": 1.0}, "val_fraction"), ({"out_dir": "runs/{colour}"}, "out_dir"),
     ({"lerning_rate": 0.1}, "unknown config field")],
)
def test_config_rejects_bad_values(values: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        T.TrainConfig.from_dict(values)


def test_split_is_seeded_stratified_and_train_only(cohort: Cohort) -> None:
    ids = cohort.ids("train")
    a = T.split_train_val(cohort.metadata, ids, 0.25, ["age_group", "menopause"], seed=1, min_val_cases=0)
    b = T.split_train_val(cohort.metadata, list(reversed(ids)), 0.25, ["age_group", "menopause"], seed=1, min_val_cases=0)
    c = T.split_train_val(cohort.metadata, ids, 0.25, ["age_group", "menopause"], seed=2, min_val_cases=0)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])
    assert sorted(a["patient_id"]) == sorted(ids)
    assert (a["split"] == "val").sum() == round(len(ids) * 0.25)
    # every stratum big enough to split keeps (about) the validation fraction
    for _, group in a.groupby("stratum"):
        n_val = (group["split"] == "val").sum()
        assert math.floor(len(group) * 0.25) <= n_val <= math.ceil(len(group) * 0.25)


def test_val_split_takes_96_cases_where_the_cohort_allows(cohort: Cohort) -> None:
    """Issue 19: max(val_fraction, 96 cases), but never more than 40 % of the training cases."""
    assert T.val_case_count(600, 0.2, 96) == 120  # 20 % is already more
    assert T.val_case_count(300, 0.2, 96) == 96  # raised to 96: 68 % left to train
    assert T.val_case_count(240, 0.2, 96) == 96  # exactly 40 %
    assert T.val_case_count(200, 0.2, 96) == 80  # 96 would leave < 60 %: 40 %
    assert T.val_case_count(300, 0.2, 0) == 60  # 0: the fraction alone (the former rule)
    assert T.val_case_count(100, 0.5, 96) == 50  # never lowered
    assert T.TrainConfig().min_val_cases == 96
    ids = cohort.ids("train")
    split = T.split_train_val(cohort.metadata, ids, 0.2, ["age_group"], seed=1, min_val_cases=96)
    assert (split["split"] == "val").sum() == math.floor(len(ids) * 0.4) == T.val_case_count(len(ids), 0.2, 96)
    with pytest.raises(ValueError, match="min_val_cases"):
        T.TrainConfig.from_dict({"min_val_cases": -1})


# ------------------------------------------------------------------------------------------------------
# one epoch of every strategy
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_one_epoch_of_each_strategy(strategy: str, synthetic_root: Path, cohort: Cohort, tmp_path: Path) -> None:
    params = {"min_support": 0.1, "t_min": 0.0, "fdr": None} if strategy in ("paper", "divaware") else {}
    cfg = tiny_config(synthetic_root, tmp_path / "run", strategy=strategy, strategy_params=params,
                      warmup_epochs=0, alpha=0.3)
    threads = torch.get_num_threads()
    run = T.train(cfg)
    assert torch.get_num_threads() == threads  # cpu_threads applies to the run only
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns) == list(T.METRIC_COLUMNS)
    assert len(metrics) == 1 and np.isfinite(metrics.loc[0, "loss"])
    assert 0.0 <= metrics.loc[0, "val_dice"] <= 1.0
    assert metrics.loc[0, "val_worst_group_dice"] <= metrics.loc[0, "val_dice"] + 1e-12
    assert metrics.loc[0, "selection"] == pytest.approx(
        0.5 * (metrics.loc[0, "val_dice"] + metrics.loc[0, "val_worst_group_dice"]))
    history = pd.read_csv(run / "weights_history.csv", dtype={"patient_id": str})
    splits = pd.read_csv(run / "splits.csv", dtype={"patient_id": str})
    train_ids = set(splits.loc[splits["split"] == "train", "patient_id"])
    assert set(history["patient_id"]) == train_ids
    # the test split is never used for training or validation
    assert set(splits["patient_id"]) <= set(cohort.ids("train"))
    assert not set(splits["patient_id"]) & set(cohort.ids("test"))
    val_scores = pd.read_csv(run / "val_scores.csv", dtype={"patient_id": str})
    assert set(val_scores["patient_id"]) == set(splits.loc[splits["split"] == "val", "patient_id"])
    if strategy in ("paper", "divaware"):
        assert history["refresh"].max() == 1  # refreshed once after the (0-epoch) warm-up
    ckpt = _load(run / "last.pt")
    assert ckpt["epoch"] == 1 and (run / "best.pt").is_file()
    assert T.TrainConfig.from_yaml(run / "config.yaml").data_root == str(Path(synthetic_root).resolve())


def test_patch_training_with_disk_cache_and_workers(synthetic_root: Path, tmp_path: Path) -> None:
    """The real-data configuration in miniature: breast crop, subtraction channel, patches, sliding-window
    validation, the disk cache under the run folder and a loader worker process."""
    cfg = tiny_config(synthetic_root, tmp_path / "patches", spacing=None, crop_to_breast=True, subtraction=True,
                      patch_size=[16, 16, 16], samples_per_case=2, batch_size=2, cache="disk", num_workers=1,
                      strategy="group_dro", strategy_params={})
    run = T.train(cfg)
    metrics = pd.read_csv(run / "metrics.csv")
    assert np.isfinite(metrics.loc[0, "loss"]) and 0.0 <= metrics.loc[0, "val_dice"] <= 1.0
    cached = list((run / "cache").rglob("*.pt"))
    splits = pd.read_csv(run / "splits.csv")
    assert len(cached) == len(splits)  # every training and validation case cached once
    assert _load(run / "last.pt")["model"]["model.0.conv.unit0.conv.weight"].shape[1] == 4  # 3 phases + subtraction


def test_weights_follow_ids_under_shuffling(cohort: Cohort) -> None:
    """Per-case weights are looked up by the patient_id each image travels with, whatever the order."""
    ids = cohort.ids("train")[:12]
    strategy = make_strategy("inverse_frequency").fit(cohort.metadata.loc[ids])
    expected = strategy.weights
    assert expected.nunique() > 1, "the test needs unequal weights"
    spec = D.DataSpec(augment=False)
    recs = D.make_records(cohort, ids, spec)
    own_image = {r[D.PID]: D.eval_transforms(spec)(dict(r))[D.IMAGE].as_tensor() for r in recs}
    ds = D.make_dataset(recs, D.train_transforms(spec), cache="memory", spec=spec, max_memory_bytes=2 * 1024**3, num_workers=0)
    for seed in (0, 1, 2):
        for batch in D.make_loader(ds, batch_size=5, shuffle=True, seed=seed, num_workers=0):
            pids = D.batch_ids(batch)
            w = strategy.batch_weights(pids, np.ones(len(pids)))
            np.testing.assert_array_equal(w, expected.loc[pids].to_numpy())
            for k, pid in enumerate(pids):
                ref = own_image[pid]
                assert torch.equal(batch[D.IMAGE][k].as_tensor()[tuple(slice(0, s) for s in ref.shape)], ref)


# ------------------------------------------------------------------------------------------------------
# exact resume, reproducibility, run-folder protection
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_epochs(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run with weight refreshes after epochs 1 and 2."""
    out = tmp_path_factory.mktemp("runs") / "full"
    return T.train(tiny_config(synthetic_root, out, epochs=2))


def _assert_same_run(a: Path, b: Path) -> None:
    assert _same_model(a / "last.pt", b / "last.pt")
    assert _same_model(a / "best.pt", b / "best.pt")
    ma, mb = (pd.read_csv(p / "metrics.csv").drop(columns=TIME_COLUMNS) for p in (a, b))
    pd.testing.assert_frame_equal(ma, mb)
    pd.testing.assert_frame_equal(pd.read_csv(a / "weights_history.csv"), pd.read_csv(b / "weights_history.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(a / "val_scores.csv"), pd.read_csv(b / "val_scores.csv"))
    oa, ob = _load(a / "last.pt")["optimizer"], _load(b / "last.pt")["optimizer"]
    for k in oa["state"]:
        assert torch.equal(oa["state"][k]["exp_avg"], ob["state"][k]["exp_avg"])


def test_kill_and_resume_equals_an_uninterrupted_run(two_epochs: Path, synthetic_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    history = pd.read_csv(two_epochs / "weights_history.csv")
    assert history["refresh"].max() >= 2 and history.groupby("refresh")["weight"].std().max() > 0
    cfg = tiny_config(synthetic_root, tmp_path / "killed", epochs=2)

    class KilledInEpoch2(Callback):  # a callback, not a monkeypatch: the loop calls it after each step
        def on_batch_end(self, trainer: Any, epoch: int, batch: int, out: dict[str, Any]) -> None:
            if epoch == 1:  # 0-based: after epoch 2's first training step, before its checkpoint
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, callbacks=[KilledInEpoch2()])
    assert _load(tmp_path / "killed" / "last.pt")["epoch"] == 1
    T.train(cfg, resume=True)
    _assert_same_run(two_epochs, tmp_path / "killed")


def test_extending_a_finished_run_by_resume_equals_training_longer(two_epochs: Path, synthetic_root: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "extended"
    # planned up front (schedule_epochs), extending equals training longer whatever the lr schedule
    T.train(tiny_config(synthetic_root, out, epochs=1, schedule_epochs=2))
    T.train(tiny_config(synthetic_root, out, epochs=2), resume=True)
    _assert_same_run(two_epochs, out)


def test_raising_epochs_on_resume_keeps_the_schedule_and_records_it(synthetic_root: Path, tmp_path: Path) -> None:
    """Issue 10: a cosine run of 1 epoch resumed to 2 keeps its 1-epoch schedule (epoch 2 at the schedule's
    final lr, not the 0.5 lr of a straight 2-epoch run), and config.yaml and metrics.csv say so; a run
    planned with schedule_epochs 2 follows the 2-epoch cosine whether it is trained at once or resumed."""
    lr = 1e-3
    out = tmp_path / "extended"
    T.train(tiny_config(synthetic_root, out, epochs=1, scheduler="cosine", lr=lr))
    with pytest.warns(UserWarning, match="schedule_epochs 1"):
        T.train(tiny_config(synthetic_root, out, epochs=2, scheduler="cosine", lr=lr), resume=True)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["schedule_epochs"] == 1
    metrics = pd.read_csv(out / "metrics.csv")
    np.testing.assert_allclose(metrics["lr"], [lr, lr])
    assert metrics["schedule_epochs"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="schedule_epochs: 1 -> 2"):  # a changed schedule is another run
        T.train(tiny_config(synthetic_root, out, epochs=3, scheduler="cosine", schedule_epochs=2), resume=True)
    planned = tmp_path / "planned"
    T.train(tiny_config(synthetic_root, planned, epochs=1, scheduler="cosine", lr=lr, schedule_epochs=2))
    T.train(tiny_config(synthetic_root, planned, epochs=2, scheduler="cosine", lr=lr), resume=True)
    metrics = pd.read_csv(planned / "metrics.csv")
    np.testing.assert_allclose(metrics["lr"], [lr, 0.5 * lr])
    assert yaml.safe_load((planned / "config.yaml").read_text())["schedule_epochs"] == 2


def test_best_checkpoint_follows_the_selection_criterion(two_epochs: Path) -> None:
    metrics = pd.read_csv(two_epochs / "metrics.csv")
    best = _load(two_epochs / "best.pt")
    expected = 0.5 * (metrics["val_dice"] + metrics["val_worst_group_dice"])
    np.testing.assert_allclose(metrics["selection"], expected)
    assert best["epoch"] == int(metrics.loc[metrics["selection"].idxmax(), "epoch"])
    assert metrics["best"].sum() >= 1 and bool(metrics.loc[metrics["epoch"] == best["epoch"], "best"].item())


def test_run_folder_is_protected(two_epochs: Path, synthetic_root: Path) -> None:
    cfg = T.TrainConfig.from_yaml(two_epochs / "config.yaml")
    with pytest.raises(ValueError, match="different config.*lr"):
        T.train(tiny_config(synthetic_root, two_epochs, epochs=2, lr=0.01))
    with pytest.raises(ValueError, match="resume=True"):
        T.train(cfg)
    before = (two_epochs / "last.pt").stat().st_mtime_ns
    assert T.train(cfg, resume=True) == two_epochs  # finished: nothing to do
    assert (two_epochs / "last.pt").stat().st_mtime_ns == before
    saved = yaml.safe_load((two_epochs / "config.yaml").read_text())
    assert saved["data_root"] == str(Path(synthetic_root).resolve())


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
        synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class PoisonAfterEpoch1(Callback):  # every loss after epoch 1's validation is NaN
        def on_validation_end(self, trainer: Any, result: ValidationResult) -> None:
            inner = trainer.task.loss_fn
            trainer.task.loss_fn = lambda logits, target: inner(logits, target) * float("nan")

    out = tmp_path / "nan"
    with pytest.raises(T.TrainingDivergedError, match=r"non-finite loss at epoch 2, batch 1 \(patient_ids ") as err:
        T.train(tiny_config(synthetic_root, out, epochs=2, warmup_epochs=5), callbacks=[PoisonAfterEpoch1()])
    splits = pd.read_csv(out / "splits.csv", dtype={"patient_id": str})
    assert any(pid in str(err.value) for pid in splits.loc[splits["split"] == "train", "patient_id"])
    assert "last good checkpoint" in str(err.value) and "(epoch 1)" in str(err.value)
    assert _load(out / "last.pt")["epoch"] == 1
    assert len(pd.read_csv(out / "metrics.csv")) == 1


def test_a_callback_sees_every_step_validation_and_epoch_without_monkeypatching(synthetic_root: Path,
                                                                               tmp_path: Path) -> None:
    """train(config, callbacks=[...]): the loop hands a callback each step's output, each validation's result
    object (the scores the metrics and the refresh used) and each epoch's metrics row."""

    class Recorder(Callback):
        def __init__(self) -> None:
            self.events: list[tuple[Any, ...]] = []

        def on_fit_start(self, trainer: Any) -> None:
            self.events.append(("start", trainer.start_epoch))

        def on_batch_end(self, trainer: Any, epoch: int, batch: int, out: dict[str, Any]) -> None:
            assert set(out) == {"ids", "losses", "weights", "objective", "n"} and len(out["ids"]) == out["n"]
            self.events.append(("batch", epoch, batch, out["n"]))

        def on_validation_end(self, trainer: Any, result: ValidationResult) -> None:
            assert sorted(result.per_case.index) == sorted(trainer.val_ids) and not result.cheap
            self.events.append(("val", result.epoch, result.metrics["val_dice"], result.best))

        def on_epoch_end(self, trainer: Any, epoch: int, row: dict[str, Any]) -> None:
            self.events.append(("epoch", epoch, row["val_dice"], row["best"]))

    rec = Recorder()
    run = T.train(tiny_config(synthetic_root, tmp_path / "cb", epochs=2), callbacks=[rec])
    log = pd.read_csv(run / "metrics.csv")
    splits = pd.read_csv(run / "splits.csv")
    batches = [e for e in rec.events if e[0] == "batch"]
    assert rec.events[0] == ("start", 0)
    assert sum(e[3] for e in batches if e[1] == 0) >= (splits["split"] == "train").sum()  # every case (+ padding)
    vals = [e for e in rec.events if e[0] == "val"]
    epochs = [e for e in rec.events if e[0] == "epoch"]
    assert [e[1] for e in vals] == [e[1] for e in epochs] == [1, 2]
    assert [e[2] for e in vals] == pytest.approx(log["val_dice"].tolist())
    assert [e[3] for e in epochs] == log["best"].tolist() == [e[3] for e in vals]


def test_the_training_step_takes_a_batch_and_its_weights_and_does_no_io(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """SegmentationTask.training_step: weights as an array or the strategy's lookup, the objective of
    losses.combine, a dict back; run in an empty folder it writes nothing."""
    from divaware.losses import combine, make_loss

    torch.manual_seed(0)
    model = T.TrainConfig(channels=[4, 8, 16], strides=[2, 2], num_res_units=0).build_model()
    task = SegmentationTask(model, make_loss("dice_ce"), torch.optim.SGD(model.parameters(), lr=0.0),
                            alpha=0.5, weight_norm="global", grad_clip=12.0, device=torch.device("cpu"))
    image = torch.randn(2, 3, 16, 16, 16)
    label = (torch.rand(2, 1, 16, 16, 16) > 0.9).float()
    batch = {"image": image, "label": label, "patient_id": ["a", "b"]}
    monkeypatch.chdir(tmp_path)
    out = task.training_step(batch, np.array([2.0, 0.5]))
    seen: list[list[str]] = []
    again = task.training_step(batch, lambda ids, losses: seen.append(list(ids)) or np.array([2.0, 0.5]))
    assert seen == [["a", "b"]] and list(out["ids"]) == ["a", "b"] and out["n"] == 2
    model.train()
    with torch.no_grad():
        per_case = make_loss("dice_ce")(model(image), label)
    np.testing.assert_allclose(out["losses"], per_case.numpy(), rtol=1e-5)  # lr 0: the model did not move
    assert out["objective"] == pytest.approx(float(combine(per_case.double(), np.array([2.0, 0.5]), 0.5, "global")))
    assert again["objective"] == pytest.approx(out["objective"])
    assert list(tmp_path.iterdir()) == []
