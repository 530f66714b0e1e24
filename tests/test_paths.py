"""Data-root resolution: explicit argument, then $DIVAWARE_DATA, then the cached synthetic cohort."""

from __future__ import annotations

from pathlib import Path

import pytest

from divaware import paths
from divaware.cohort import load_cohort


def test_explicit_root_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_root = tmp_path / "env"
    env_root.mkdir()
    monkeypatch.setenv(paths.DATA_ENV, str(env_root))
    assert paths.resolve_data_root(str(tmp_path)) == tmp_path
    assert paths.resolve_data_root("") == env_root
    with pytest.raises(FileNotFoundError, match="does not exist"):
        paths.resolve_data_root(str(tmp_path / "missing"))


def test_synthetic_default_is_generated_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
    root = paths.resolve_data_root("", n_cases=8, seed=3)
    # the folder name carries the generator's hash, so an edited generator never reuses a stale cohort
    assert root == tmp_path / f"synthetic-default-teaching-n8-seed3-{paths.generator_tag()}"
    assert len(load_cohort(root).metadata) == 8
    stamp = (root / "clinical_and_imaging_info.xlsx").stat().st_mtime_ns
    assert paths.resolve_data_root("", n_cases=8, seed=3) == root
    assert (root / "clinical_and_imaging_info.xlsx").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no staging folder left behind


def test_relative_outputs_go_under_the_runs_root_whatever_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(paths.__file__).resolve().parents[1]
    monkeypatch.delenv(paths.RUNS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # e.g. JupyterLab's kernel in notebooks/
    assert paths.repo_root() == repo
    assert paths.resolve_output("notebooks/runs/erm") == repo / "runs" / "notebooks" / "runs" / "erm"
    assert paths.resolve_output(tmp_path / "abs") == tmp_path / "abs"
    monkeypatch.setenv(paths.RUNS_ENV, str(tmp_path / "elsewhere"))
    assert paths.resolve_output("notebooks/03") == tmp_path / "elsewhere" / "notebooks" / "03"


def test_each_disparity_mechanism_has_its_own_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
    tag = paths.generator_tag()
    assert paths.synthetic_root(300, 0).name == f"synthetic-default-teaching-n300-seed0-{tag}"
    assert paths.synthetic_root(300, 0, disparity="intrinsic").name == f"synthetic-default-teaching-intrinsic-n300-seed0-{tag}"
    names = {paths.synthetic_root(300, 0, disparity=d).name for d in ("default", "representation", "intrinsic")}
    assert len(names) == 3
