"""Weights in other trainers: the WeightedRandomSampler recipe and the nnU-Net v2 converter and trainer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from divaware.cohort import load_cohort
from divaware.external import mixed_weights, read_weights, weighted_sampler, weights_for
from divaware.nnunet import to_nnunet_raw

REPO = Path(__file__).resolve().parents[1]


def _weights(ids: list[str]) -> pd.Series:
    return pd.Series(np.linspace(0.2, 5.0, len(ids)), index=pd.Index(ids, name="patient_id"), name="weight")


def test_sampler_frequencies_follow_the_weights(tmp_path: Path) -> None:
    import torch

    ids = [f"CASE_{i:02d}" for i in range(8)]
    w = _weights(ids)
    w.to_frame().to_csv(tmp_path / "weights.csv")
    weights = read_weights(tmp_path / "weights.csv")
    order = ids[::-1]  # the dataset's order differs from the CSV's: lookup by id, not position
    sampler = weighted_sampler(weights, [i.lower() for i in order], num_samples=200_000,
                               generator=torch.Generator().manual_seed(0))
    counts = np.bincount(np.fromiter(iter(sampler), dtype=int), minlength=len(order))
    freq = counts / counts.sum()
    expected = w.loc[order].to_numpy() / w.sum()
    np.testing.assert_allclose(freq, expected, atol=0.004)
    assert freq[0] / freq[-1] == pytest.approx(5.0 / 0.2, rel=0.1)  # CASE_07 vs CASE_00
    assert len(weighted_sampler(weights, order)) == len(order)


def test_weights_lookup_errors_and_mixing(tmp_path: Path) -> None:
    w = _weights(["A", "B"])
    with pytest.raises(ValueError, match="C"):
        weights_for(w, ["A", "C"])
    np.testing.assert_allclose(mixed_weights(w, 0.5).to_numpy(), 0.5 + 0.5 * w.to_numpy())
    pd.DataFrame({"patient_id": ["A"], "weight": [0.0]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="A"):
        read_weights(tmp_path / "bad.csv")


def test_nnunet_module_imports_without_nnunetv2_or_torch() -> None:
    code = ("import sys, json; import divaware.nnunet as n; "
            "print(json.dumps(sorted(m for m in ('nnunetv2', 'torch') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        import divaware.nnunet as n

        with pytest.raises(ImportError, match=r"divaware\[nnunet\]"):
            n.nnUNetTrainerDivaware  # noqa: B018


def test_to_nnunet_raw(synthetic_root: Path, tmp_path: Path) -> None:
    cohort = load_cohort(synthetic_root, check_voxels=False)
    ids = cohort.ids("train")[:5]
    folder = to_nnunet_raw(synthetic_root, tmp_path / "raw", 901, patient_ids=ids)
    assert folder.name == "Dataset901_MAMAMIA"
    images = sorted(p.name for p in (folder / "imagesTr").iterdir())
    assert images == sorted(f"{i}_{c:04d}.nii.gz" for i in ids for c in (0, 1))
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == sorted(f"{i}.nii.gz" for i in ids)
    assert (folder / "imagesTr" / f"{ids[0]}_0001.nii.gz").read_bytes() == cohort.cases[ids[0]].image_paths[1].read_bytes()
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 5 and meta["labels"] == {"background": 0, "tumour": 1}
    assert list(meta["channel_names"]) == ["0", "1"] and meta["file_ending"] == ".nii.gz"
    with pytest.raises(ValueError, match="inside the data folder"):
        to_nnunet_raw(synthetic_root, synthetic_root / "nn", 902, patient_ids=ids)
    with pytest.raises(ValueError, match="phases"):
        to_nnunet_raw(synthetic_root, tmp_path / "raw", 903, patient_ids=ids, phases=(0, 1, 9))


def _nnunet_python() -> str | None:
    """A Python with nnunetv2: this one, or $DIVAWARE_NNUNET_PYTHON (e.g. a separate venv)."""
    try:
        import nnunetv2  # noqa: F401

        return sys.executable
    except ImportError:
        return os.environ.get("DIVAWARE_NNUNET_PYTHON") or None


@pytest.mark.skipif(_nnunet_python() is None,
                    reason="nnunetv2 not installed (pip install divaware[nnunet], or set DIVAWARE_NNUNET_PYTHON)")
def test_nnunet_trainer_scales_each_case_loss_by_its_weight(synthetic_root: Path, tmp_path: Path) -> None:
    python = _nnunet_python()
    ids = load_cohort(synthetic_root, check_voxels=False).ids("train")[:10]
    to_nnunet_raw(synthetic_root, tmp_path / "raw", 901, patient_ids=ids)
    weights = _weights(ids)
    weights.to_frame().to_csv(tmp_path / "weights.csv")
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res"), "nnUNet_n_proc_DA": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "DIVAWARE_ALPHA": "0.25"}
    bindir = Path(python).parent
    plan = shutil.which("nnUNetv2_plan_and_preprocess", path=str(bindir)) or "nnUNetv2_plan_and_preprocess"
    proc = subprocess.run([plan, "-d", "901", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    env["nnUNet_n_proc_DA"] = "0"  # single-threaded augmentation: no background workers in a test
    proc = subprocess.run([python, str(REPO / "tests" / "nnunet_worker.py"), "901", str(tmp_path / "weights.csv"),
                           "2"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(steps) == 2
    for step in steps:
        assert step["class"] == "nnUNetTrainerDivaware" and step["alpha"] == 0.25 and step["ext_found"]
        expected_scale = 0.25 + 0.75 * weights.loc[step["keys"]].to_numpy()
        np.testing.assert_allclose(step["scale"], expected_scale, rtol=1e-6)
        case_loss = np.array(step["case_loss"])
        # the loss back-propagated is the weighted mean of the per-case losses, not their plain mean
        assert step["loss"] == pytest.approx(float(np.mean(expected_scale * case_loss)), rel=1e-5)
        if not np.allclose(expected_scale, 1.0):
            assert step["loss"] != pytest.approx(float(case_loss.mean()), rel=1e-3)


def test_install_trainer_copies_into_nnunets_own_trainer_folder(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from divaware.nnunet import ext_trainer_path, install_trainer

    site = tmp_path / "site"  # a stand-in installation: the folder layout only (a real one is never written)
    folder = site / "nnunetv2" / "training" / "nnUNetTrainer"
    folder.mkdir(parents=True)
    for init in (site / "nnunetv2", site / "nnunetv2" / "training", folder):
        (init / "__init__.py").write_text("")
    (folder / "nnUNetTrainer.py").write_text("class nnUNetTrainer: ...\n")
    if importlib.util.find_spec("nnunetv2") is None:
        monkeypatch.syspath_prepend(str(site))
        target = install_trainer()  # found through the import system, nothing of nnU-Net imported
    else:
        target = install_trainer(folder)
    assert target == folder / "divaware_trainer.py" and target.name == "divaware_trainer.py" and (target.parent / "nnUNetTrainer.py").is_file()
    assert target.read_bytes() == (ext_trainer_path() / "divaware_trainer.py").read_bytes()
    with pytest.raises(ValueError, match="not nnU-Net's trainer folder"):
        install_trainer(tmp_path)
