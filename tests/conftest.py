"""Shared fixtures: one tiny synthetic MAMA-MIA cohort per test session.

``synthetic_root`` is generated once (40 cases, seed 0, default preset: 48 x 48 x 32 volumes, ~2 MB) and is
read-only by convention: a test that needs to change files must work on ``cohort_copy`` instead. At the end
of the session the fixture checks that no file under it was added, removed or modified, so a test (or a
module under test) that writes into its input folder fails loudly.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from divaware.cohort import Cohort, load_cohort
from divaware.synthetic import make_cohort

SYNTHETIC_CASES = 40
SYNTHETIC_SEED = 0


def folder_listing(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file and folder under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session", autouse=True)
def private_preprocessed_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Runs with ``cache: auto``/``preprocessed`` share voxel checks and preprocessed cases through the
    user's store (``divaware.preprocess.store_root``): tests use a session folder of their own instead."""
    folder = tmp_path_factory.mktemp("preprocessed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIVAWARE_PREPROCESSED", str(folder))
        yield folder


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 40-case synthetic cohort in the real MAMA-MIA layout; never write into it."""
    root = tmp_path_factory.mktemp("mama_mia") / "synthetic"
    make_cohort(root, n_cases=SYNTHETIC_CASES, seed=SYNTHETIC_SEED)
    before = folder_listing(root)
    yield root
    assert folder_listing(root) == before, (
        "a test wrote into the shared synthetic cohort; use the cohort_copy fixture for tests that change files"
    )


@pytest.fixture
def cohort(synthetic_root: Path) -> Cohort:
    """The shared synthetic cohort, loaded afresh for each test (so tests may modify the object)."""
    return load_cohort(synthetic_root)


@pytest.fixture
def cohort_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the shared synthetic cohort (for tests that break or edit files)."""
    dest = tmp_path / "cohort"
    shutil.copytree(synthetic_root, dest)
    return dest
