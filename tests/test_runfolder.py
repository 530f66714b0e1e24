"""The run folder (layout, atomic writes, lock), the config checked before any data is read, and the
package's structure rules (run-folder file names in one module, short functions)."""

from __future__ import annotations

import ast
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import divaware.train as T
from divaware import evaluate as E
from divaware.runfolder import RunFolder, RunFolderBusy, write_text

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("config.yaml", "splits.csv", "metrics.csv", "val_scores.csv", "weights_history.csv", "last.pt",
             "best.pt", "run.lock")


def tiny(root: Path, out: Path, **overrides: Any) -> T.TrainConfig:
    values: dict[str, Any] = {
        "data_root": str(root), "out_dir": str(out), "spacing": [5.0, 5.0, 5.0], "channels": [4, 8, 16],
        "strides": [2, 2], "num_res_units": 1, "epochs": 1, "batch_size": 4, "val_fraction": 0.25,
        "warmup_epochs": 1, "update_every": 1, "scheduler": "constant", "progress": False, "cache": "memory",
        "strategy_params": {"min_support": 0.1, "t_min": 0.0, "fdr": None}, "cpu_threads": 1,
    }
    values.update(overrides)
    return T.TrainConfig(**values)


# ------------------------------------------------------------------------------------------------------
# structure
# ------------------------------------------------------------------------------------------------------


def test_run_folder_file_names_live_in_one_module() -> None:
    pattern = re.compile(r"""["']({})["']""".format("|".join(re.escape(n) for n in RUN_FILES)))
    holders = []
    for folder in ("divaware", "benchmarks"):
        for path in sorted((REPO / folder).glob("*.py")):
            if pattern.search(path.read_text(encoding="utf-8")):
                holders.append(str(path.relative_to(REPO)))
    assert holders == ["divaware/runfolder.py"]


def test_no_function_longer_than_100_lines() -> None:
    long = []
    for path in sorted((REPO / "divaware").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 100:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


# ------------------------------------------------------------------------------------------------------
# atomic writes and the lock
# ------------------------------------------------------------------------------------------------------


def test_atomic_write_leaves_no_temporary_file_on_failure(tmp_path: Path) -> None:
    from divaware.runfolder import atomic_write

    target = tmp_path / "x.csv"
    write_text(target, "old\n")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, broken)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv"]


def test_a_second_training_into_the_same_folder_refuses(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from divaware.runfolder import RunFolder; r = RunFolder(sys.argv[1]); r.acquire(); "
        "print('held', flush=True); time.sleep(60)"), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=rf"in use by pid {holder.pid} on host {socket.gethostname()} since "):
            T.train(tiny(synthetic_root, out))
        assert not (out / "config.yaml").exists()  # refused before touching the folder
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_released(synthetic_root: Path, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / RunFolder.LOCK).write_text(f'{{"pid": {dead.pid}, "host": "{socket.gethostname()}", "since": "x"}}')
    with pytest.warns(UserWarning, match="stale lock"):
        T.train(tiny(synthetic_root, out))
    assert (out / "metrics.csv").is_file() and not (out / RunFolder.LOCK).exists()


def test_the_lock_is_released_after_an_error(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="patch_size"):
        T.train(tiny(synthetic_root, out, spacing=None, patch_size=[64, 64, 64]))
    assert not (out / RunFolder.LOCK).exists()
    RunFolder(out).acquire()  # free again
    RunFolder(out).release()


# ------------------------------------------------------------------------------------------------------
# config: checked before any data is read
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "match"), [
    ({"strategy_params": {"min_suport": 0.1}}, r"strategy_params.*'min_suport'.*did you mean 'min_support'"),
    ({"strategy": "group_dro", "strategy_params": {"tau": 0.1}}, r"'tau' is not a parameter of strategy 'group_dro'"),
    ({"model_kwargs": {"bogus": 1}}, r"model_kwargs.*'bogus' is not a parameter of model 'unet'"),
    ({"epochs": True}, r"'epochs': True is a boolean"),
    ({"lr": True}, r"'lr': True is a boolean"),
])
def test_bad_config_fails_before_any_data_is_read(values: dict[str, Any], match: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import divaware.cohort

    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cohort was read before the config was checked")

    monkeypatch.setattr(divaware.cohort, "load_cohort", no_data)
    with pytest.raises(ValueError, match=match) as err:
        T.train(T.TrainConfig.from_dict({"data_root": str(tmp_path / "absent"), "out_dir": str(tmp_path / "r"),
                                         **values}))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "r").exists()


def test_non_utf8_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes("epochs: 3\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"bad\.yaml is not UTF-8"):
        T.TrainConfig.from_yaml(path)


def test_strategy_defaults_are_the_main_jobs() -> None:
    from divaware.weighting import DEFAULTS, make_strategy

    s = make_strategy("divaware")
    assert (s.min_support, s.warmup_epochs, s.update_every) == (0.05, 6, 3)
    assert DEFAULTS["divaware"]["min_support"] == 0.05
    assert (T.TrainConfig().warmup_epochs, T.TrainConfig().update_every) == (6, 3)


# ------------------------------------------------------------------------------------------------------
# worst group: one rule for selection and reports
# ------------------------------------------------------------------------------------------------------


def test_worst_group_counts_unknown_menopause_only() -> None:
    from divaware.metrics import worst_group

    ids = [f"c{i}" for i in range(6)]
    scores = pd.Series([0.1, 0.1, 0.9, 0.9, 0.5, 0.5], index=ids)
    groups = pd.DataFrame({"breast_density": ["unknown", "unknown", "a", "a", "b", "b"],
                           "menopause": ["post", "post", "unknown", "unknown", "pre", "pre"]}, index=ids)
    assert worst_group(scores, groups, 1) == (pytest.approx(0.1), "menopause=post")
    groups["menopause"] = ["unknown", "unknown", "post", "post", "pre", "pre"]
    assert worst_group(scores, groups, 1) == (pytest.approx(0.1), "menopause=unknown")
    assert worst_group(scores, groups[["breast_density"]], 1) == (pytest.approx(0.5), "breast_density=b")


# ------------------------------------------------------------------------------------------------------
# a run folder written before this change resumes and evaluates
# ------------------------------------------------------------------------------------------------------


def test_a_run_folder_of_the_former_layout_resumes_and_evaluates(synthetic_root: Path, tmp_path: Path) -> None:
    """The former code wrote the same files, with its voxel cache always in ``<run>/cache`` and no lock; a
    run with ``cache_dir`` set kept the voxel checks there while predict/evaluate looked in ``<run>/cache``."""
    out, cache = tmp_path / "run", tmp_path / "elsewhere"
    T.train(tiny(synthetic_root, out, epochs=1, cache_dir=str(cache)))
    # what the former code left behind: the same files; a temporary file of the old naming from a kill
    (out / ".last.pt.tmp").write_bytes(b"partial")
    before = pd.read_csv(out / "metrics.csv")
    assert sorted(p.name for p in (cache).iterdir()) == ["voxel_checks.json"]
    run = T.train(tiny(synthetic_root, out, epochs=2, cache_dir=str(cache)), resume=True)
    after = pd.read_csv(run / "metrics.csv")
    assert list(after["epoch"]) == [1, 2]
    pd.testing.assert_series_equal(after["loss"].iloc[:1], before["loss"])
    assert RunFolder(run).cache_dir() == cache  # predict and evaluate find the same cache as training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = E.evaluate(run, None, split="val", n_boot=0, verbose=False)
    assert len(res.per_case) == len(RunFolder(run).split_ids("val"))
    assert not (run / "cache").exists()  # nothing written to the former, wrong, location
    shutil.rmtree(run)
