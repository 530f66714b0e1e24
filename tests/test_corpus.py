"""The bad-data corpus: every defect of one case's files has one named outcome in every command.

Each defect of :data:`DEFECTS` is built in a private copy of a tiny synthetic cohort (on one training case
and one test case), then ``divaware check`` (also ``--strict``), ``load_cohort`` (strict and not), a
one-epoch ``train``, ``predict`` and ``evaluate`` run on it. Asserted: the named outcome (``exclude``: the
cases are named in a warning / the report and never trained on, predicted or scored; ``report``: the cases
are kept and the problem is named), no exception, and a byte-identical data folder. The defect table in the
``divaware.cohort`` docstring and in the README must list exactly these defects with these outcomes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import divaware.cohort as cohort_module
from divaware.cli import main as cli_main
from divaware.cohort import CohortError, load_cohort
from divaware.synthetic import make_cohort

N_CASES, SEED = 14, 3
README = Path(__file__).resolve().parents[1] / "README.md"


# --------------------------------------------------------------------------------------------------
# defect builders: (root, patient_id) -> None, changing that case's files in place
# --------------------------------------------------------------------------------------------------


def _phase(root: Path, pid: str, k: int) -> Path:
    return root / "images" / pid / f"{pid.lower()}_{k:04d}.nii.gz"


def _mask(root: Path, pid: str) -> Path:
    return root / "segmentations" / "expert" / f"{pid}.nii.gz"


def _rewrite(path: Path, arr: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj) if arr is None else arr
    out = nib.Nifti1Image(data, img.affine if affine is None else affine)
    out.set_data_dtype(data.dtype)
    nib.save(out, str(path))


def _mask_array(root: Path, pid: str) -> np.ndarray:
    return np.asanyarray(nib.load(str(_mask(root, pid))).dataobj).astype(np.float32)


def _truncate(path: Path) -> None:
    # keep the NIfTI header (first bytes of the gzip stream), cut the voxel data
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: max(200, len(gzip.compress(raw)) // 2)])


def _mask_times(value: float, dtype: type) -> Callable[[Path, str], None]:
    def build(root: Path, pid: str) -> None:
        _rewrite(_mask(root, pid), (_mask_array(root, pid) * value).astype(dtype))
    return build


def _mask_nan(root: Path, pid: str) -> None:
    m = _mask_array(root, pid)
    idx = np.flatnonzero(m)
    m.flat[idx[: len(idx) // 2]] = np.nan
    _rewrite(_mask(root, pid), m)


def _image_value(value: float) -> Callable[[Path, str], None]:
    def build(root: Path, pid: str) -> None:
        path = _phase(root, pid, 1)
        arr = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
        arr[10:14, 10:14, 5:8] = value
        _rewrite(path, arr)
    return build


def _phase_affine(root: Path, pid: str) -> None:
    path = _phase(root, pid, 1)
    affine = nib.load(str(path)).affine.copy()
    affine[:3, 3] += 5.0  # origin shifted by 5 mm
    _rewrite(path, affine=affine)


def _phase_all_zero(root: Path, pid: str) -> None:
    path = _phase(root, pid, 2)
    arr = np.asanyarray(nib.load(str(path)).dataobj)
    _rewrite(path, np.zeros_like(arr))


def _mask_inverted(root: Path, pid: str) -> None:
    _rewrite(_mask(root, pid), (1 - _mask_array(root, pid)).astype(np.uint8))


def _mask_transposed(root: Path, pid: str) -> None:
    _rewrite(_mask(root, pid), _mask_array(root, pid).transpose(1, 0, 2).astype(np.uint8))


def _mask_affine(scale: tuple[float, float, float]) -> Callable[[Path, str], None]:
    def build(root: Path, pid: str) -> None:
        path = _mask(root, pid)
        affine = nib.load(str(path)).affine.copy()
        affine[:3, :3] = affine[:3, :3] @ np.diag(scale)
        _rewrite(path, affine=affine)
    return build


def _blank_patient_id(root: Path, pid: str) -> None:
    xlsx = root / "clinical_and_imaging_info.xlsx"
    frame = pd.read_excel(xlsx, sheet_name="dataset_info")
    row = frame[frame["patient_id"] == pid].copy()
    row["patient_id"] = None
    frame = pd.concat([frame, row], ignore_index=True)
    with pd.ExcelWriter(xlsx, engine="openpyxl") as writer:
        frame.to_excel(writer, sheet_name="dataset_info", index=False)


def _breast_box_inverted(root: Path, pid: str) -> None:
    path = root / "patient_info_files" / f"{pid.lower()}.json"
    info = json.loads(path.read_text())
    box = info["primary_lesion"]["breast_coordinates"]
    box["x_min"], box["x_max"] = box["x_max"], box["x_min"]
    path.write_text(json.dumps(info))


def _header_fields(path: Path, *, pixdim: Callable[[list[float]], None] | None = None,
                   srow: Callable[[list[list[float]]], None] | None = None) -> None:
    """Rewrite raw NIfTI-1 header fields of a .nii.gz byte for byte (nibabel would 'repair' them on save):
    ``pixdim`` (8 floats at offset 76) and the sform rows ``srow_x/y/z`` (3 x 4 floats at offset 280)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    if pixdim is not None:
        values = list(struct.unpack("<8f", raw[76:108]))
        pixdim(values)
        raw[76:108] = struct.pack("<8f", *values)
    if srow is not None:
        rows = [list(struct.unpack("<4f", raw[280 + 16 * i: 296 + 16 * i])) for i in range(3)]
        srow(rows)
        for i, row in enumerate(rows):
            raw[280 + 16 * i: 296 + 16 * i] = struct.pack("<4f", *row)
    path.write_bytes(gzip.compress(bytes(raw)))


def _case_files(root: Path, pid: str) -> list[Path]:
    return [*sorted((root / "images" / pid).glob("*.nii.gz")), _mask(root, pid)]


def _every_file(pixdim: Callable[[list[float]], None] | None = None,
                srow: Callable[[list[list[float]]], None] | None = None) -> Callable[[Path, str], None]:
    """The same header change in every file of the case (phases and mask): a consistent geometry defect."""
    def build(root: Path, pid: str) -> None:
        for path in _case_files(root, pid):
            _header_fields(path, pixdim=pixdim, srow=srow)
    return build


def _set(index: int, value: float | Callable[[float], float]) -> Callable[[list[float]], None]:
    def change(values: list[float]) -> None:
        values[index] = value(values[index]) if callable(value) else value
    return change


def _zero_z_column(rows: list[list[float]]) -> None:
    for row in rows:
        row[2] = 0.0


def _huge_spacing_pixdim(values: list[float]) -> None:
    values[1:4] = [1e6, 1e6, 1e6]


def _huge_spacing_srow(rows: list[list[float]]) -> None:
    for i, row in enumerate(rows):
        row[i] = 1e6 * (1.0 if row[i] >= 0 else -1.0)


def _nan_srow(rows: list[list[float]]) -> None:
    rows[0][0] = float("nan")


def _corrupt_crc(root: Path, pid: str) -> None:
    path = _phase(root, pid, 1)
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # the stored CRC-32 of the gzip trailer; the header and data stay readable
    path.write_bytes(bytes(raw))


def _dangling_link(root: Path, pid: str) -> None:
    path = _phase(root, pid, 1)
    path.unlink()
    path.symlink_to(root / "elsewhere" / path.name)


def _phases_swapped(root: Path, pid: str) -> None:
    a, b = _phase(root, pid, 0), _phase(root, pid, 1)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def _id_bom(root: Path, pid: str) -> None:
    xlsx = root / "clinical_and_imaging_info.xlsx"
    frame = pd.read_excel(xlsx, sheet_name="dataset_info")
    frame.loc[frame["patient_id"] == pid, "patient_id"] = "\ufeff" + pid
    with pd.ExcelWriter(xlsx, engine="openpyxl") as writer:
        frame.to_excel(writer, sheet_name="dataset_info", index=False)


def _mask_pasted(root: Path, pid: str) -> None:
    """Another case's mask on this case's grid (same shape), lying off this case's tumour."""
    own = _mask_array(root, pid) == 1
    for other in sorted((root / "segmentations" / "expert").glob("*.nii.gz")):
        theirs = np.asanyarray(nib.load(str(other)).dataobj) == 1
        if other.name != f"{pid}.nii.gz" and theirs.shape == own.shape and theirs.any() \
                and np.count_nonzero(theirs & own) == 0:
            _rewrite(_mask(root, pid), theirs.astype(np.uint8))
            return
    raise AssertionError(f"no other mask to paste onto {pid}")


def _post_phases(root: Path, pid: str) -> list[Path]:
    return sorted((root / "images" / pid).glob("*.nii.gz"))[1:]


def _no_rise(where: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path, str], None]:
    """Every post-contrast phase set to the pre-contrast value over ``where(mask)``: tissue that does not enhance."""
    def build(root: Path, pid: str) -> None:
        mask = _mask_array(root, pid) == 1
        region = where(mask)
        pre = np.asanyarray(nib.load(str(_phase(root, pid, 0))).dataobj)
        for path in _post_phases(root, pid):
            arr = np.asanyarray(nib.load(str(path)).dataobj).copy()
            arr[region] = pre[region]
            _rewrite(path, arr)
    return build


def _necrotic_core(mask: np.ndarray, fraction: float = 0.55) -> np.ndarray:
    """The deepest ``fraction`` of the mask (distance to its surface): a necrotic core."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(mask)
    order = np.argsort(-depth[mask], kind="stable")
    core = np.zeros(int(mask.sum()), dtype=bool)
    core[order[: int(round(fraction * mask.sum()))]] = True
    out = np.zeros_like(mask)
    out[mask] = core
    return out


def _rim_inside(mask: np.ndarray) -> np.ndarray:
    """The deepest 70 % of the mask: only a thin outer rim (30 % of its voxels) enhances."""
    return _necrotic_core(mask, 0.7)


def _box_without_tumour(root: Path, pid: str) -> None:
    """Move the JSON's breast box beside the tumour (x/y/z index the SimpleITK array: z -> NIfTI axis i)."""
    path = root / "patient_info_files" / f"{pid.lower()}.json"
    info = json.loads(path.read_text())
    mask = _mask_array(root, pid) == 1
    i = np.nonzero(mask.any(axis=(1, 2)))[0]
    n = mask.shape[0]
    lo, hi = (int(i[-1]) + 1, n) if n - int(i[-1]) - 1 >= int(i[0]) else (0, int(i[0]))
    box = info["primary_lesion"]["breast_coordinates"]
    box["z_min"], box["z_max"] = lo, hi
    path.write_text(json.dumps(info))


def _phase_binary(root: Path, pid: str) -> None:
    path = _phase(root, pid, 2)
    arr = np.asanyarray(nib.load(str(path)).dataobj)
    _rewrite(path, (arr > np.median(arr)).astype(np.int16))  # a thresholded image saved as the phase


def _phase_near_blank(root: Path, pid: str) -> None:
    path = _phase(root, pid, 2)
    arr = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
    out = np.zeros_like(arr)
    out[:4, :4, :3] = arr[:4, :4, :3] + 1.0  # a few voxels survive: not constant, but no image either
    _rewrite(path, out)


def _qform_30mm(root: Path, pid: str) -> None:
    path = _phase(root, pid, 1)
    img = nib.load(str(path))
    qform = img.affine.copy()
    qform[:3, 3] += 30.0 / np.sqrt(3)  # 30 mm away; the sform (what nibabel and MONAI read) intact
    img.header.set_qform(qform, code=1)
    img.header.set_sform(img.affine, code=1)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header), str(path))


def _shear(rows: list[list[float]]) -> None:
    # the y column tilted towards x by 0.2 rad, its length (the voxel spacing) kept
    y = np.array([rows[0][1], rows[1][1], rows[2][1]])
    x = np.array([rows[0][0], rows[1][0], rows[2][0]])
    tilted = np.cos(0.2) * y + np.sin(0.2) * np.linalg.norm(y) * x / np.linalg.norm(x)
    for i in range(3):
        rows[i][1] = float(tilted[i])


# defect id -> (outcome, builder, text the warning/report must contain)
DEFECTS: dict[str, tuple[str, Callable[[Path, str], None], str]] = {
    "truncated_image": ("exclude", lambda r, p: _truncate(_phase(r, p, 1)), "truncated or corrupt"),
    "truncated_mask": ("exclude", lambda r, p: _truncate(_mask(r, p)), "cannot read"),
    "phase_affine": ("exclude", _phase_affine, "different affine"),
    "mask_0_2": ("exclude", _mask_times(2, np.uint8), "not binary"),
    "mask_0_255": ("exclude", _mask_times(255, np.uint8), "not binary"),
    "mask_half": ("exclude", _mask_times(0.5, np.float32), "not binary"),
    "mask_0_3": ("exclude", _mask_times(0.3, np.float32), "not binary"),
    "mask_nan": ("exclude", _mask_nan, "not binary"),
    "mask_inverted": ("exclude", _mask_inverted, "inverted"),
    "mask_transposed": ("report", _mask_transposed, "may be misplaced"),
    "mask_pasted": ("report", _mask_pasted, "may be misplaced"),
    "necrotic_core": ("report", _no_rise(_necrotic_core), "enhances weakly"),
    "rim_enhancing": ("report", _no_rise(_rim_inside), "enhances weakly"),
    "phases_swapped": ("report", _phases_swapped, "look swapped"),
    "mask_affine_flipped": ("exclude", _mask_affine((-1.0, 1.0, 1.0)), "different affine"),
    "mask_spacing_x2": ("exclude", _mask_affine((2.0, 2.0, 2.0)), "different affine"),
    "image_nan": ("exclude", _image_value(np.nan), "NaN/Inf"),
    "image_inf": ("exclude", _image_value(np.inf), "NaN/Inf"),
    "image_huge": ("exclude", _image_value(1e36), "intensities up to"),
    "phase_all_zero": ("exclude", _phase_all_zero, "constant"),
    "phase_binary": ("exclude", _phase_binary, "a binary image"),
    "phase_near_blank": ("exclude", _phase_near_blank, "nearly blank"),
    "qform_sform_30mm": ("report", _qform_30mm, "qform and sform disagree by up to 30.0 mm"),
    "sform_sheared": ("report", _every_file(srow=_shear), "sform is sheared"),
    "blank_patient_id": ("report", _blank_patient_id, "without patient_id"),
    "breast_box_inverted": ("report", _breast_box_inverted, "x_min"),
    "breast_box_no_tumour": ("report", _box_without_tumour, "holds no tumour voxel"),
    "spacing_zero": ("exclude", _every_file(_set(3, 0.0), _zero_z_column), "zero spacing"),
    "pixdim_zero_sform_intact": ("exclude", _every_file(_set(3, 0.0)), "disagrees with its affine"),
    "spacing_nan": ("exclude", _every_file(_set(3, float("nan"))), "zero, negative or NaN"),
    "spacing_1e6": ("exclude", _every_file(_huge_spacing_pixdim, _huge_spacing_srow), "implausible voxel spacing"),
    "pixdim_sform_disagree": ("exclude", _every_file(_set(3, lambda v: 2 * v)), "disagrees with its affine"),
    "affine_nan": ("exclude", lambda r, p: _header_fields(_phase(r, p, 1), srow=_nan_srow), "NaN in affine"),
    "mask_affine_nan": ("exclude", lambda r, p: _header_fields(_mask(r, p), srow=_nan_srow), "NaN in affine"),
    "gzip_crc": ("exclude", _corrupt_crc, "CRC check failed"),
    "dangling_symlink": ("exclude", _dangling_link, "which does not exist"),
    "id_bom": ("report", _id_bom, "invisible characters"),
}


# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "cohort"
    make_cohort(root, n_cases=N_CASES, seed=SEED)
    return root


def _moves_tumour(c: object, pid: str) -> bool:
    """Whether transposing the mask moves it off the tumour (a transposed mask still on the tumour is harmless)."""
    m = np.asanyarray(nib.load(str(c.cases[pid].mask_path)).dataobj) == 1
    return np.count_nonzero(m & m.transpose(1, 0, 2)) < 0.1 * np.count_nonzero(m)


def _victims(root: Path, defect: str = "") -> tuple[str, str]:
    """One training case and one test case to break."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = load_cohort(root)
    train, test = c.ids("train")[1:], c.ids("test")
    if defect == "mask_transposed":
        train, test = [i for i in train if _moves_tumour(c, i)], [i for i in test if _moves_tumour(c, i)]
    return train[0], test[0]


def _fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def _train_config(root: Path, out: Path) -> object:
    from divaware.train import TrainConfig

    return TrainConfig(data_root=str(root), out_dir=str(out), epochs=1, batch_size=4, channels=[4, 8, 16],
                       strides=[2, 2], num_res_units=0, augment=False, strategy="erm", stratify=[],
                       min_group_size=1, cache="memory", progress=False, cpu_threads=1, val_fraction=0.25)


def _messages(record: list[warnings.WarningMessage]) -> str:
    return "\n".join(str(w.message) for w in record)


def run_all_commands(root: Path, work: Path, capsys: pytest.CaptureFixture[str],
                     evaluate_predicts: bool = False) -> dict[str, object]:
    """check, check --strict, load (strict and not), train, predict and evaluate on ``root``.

    ``evaluate_predicts=False`` lets evaluate score predict()'s files instead of predicting again (the same
    predict() call, so the corpus stays fast)."""
    from divaware.evaluate import evaluate
    from divaware.predict import predict

    out: dict[str, object] = {}
    out["check_rc"] = cli_main(["check", str(root)])
    out["check_out"] = capsys.readouterr().out
    out["strict_rc"] = cli_main(["check", "--strict", str(root)])
    out["strict_err"] = capsys.readouterr().err
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out["cohort"] = load_cohort(root)
    out["load_warnings"] = _messages(rec)
    try:
        load_cohort(root, strict=True)
        out["strict_load"] = None
    except CohortError as err:
        out["strict_load"] = str(err)
    run = work / "run"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        from divaware.train import train

        train(_train_config(root, run))
    out["train_warnings"] = _messages(rec)
    out["splits"] = pd.read_csv(run / "splits.csv", dtype={"patient_id": str})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pred = predict(run, root, split="test", out_dir=work / "pred", progress=False, cpu_threads=1)
    out["predict_warnings"] = _messages(rec)
    out["predicted"] = sorted(p.name[: -len(".nii.gz")] for p in (pred / "pred_segmentations").glob("*.nii.gz"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        kwargs = {"cpu_threads": 1} if evaluate_predicts else {"predictions": pred}
        res = evaluate(run, root, split="test", n_boot=10, min_support=0.3, verbose=False, **kwargs)
    out["evaluate_warnings"] = _messages(rec)
    out["scored"] = list(res.per_case.index)
    return out


# --------------------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_defect_has_its_named_outcome_in_every_command(defect: str, tiny_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    outcome, build, text = DEFECTS[defect]
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    train_pid, test_pid = _victims(root, defect)
    victims = [train_pid, test_pid]
    for pid in victims:
        build(root, pid)
    before = _fingerprint(root)
    healthy_test = [i for i in load_cohort(tiny_root).ids("test") if i not in victims]

    r = run_all_commands(root, tmp_path / "work", capsys)

    # check: the report names the problem; exit 1; --strict stops with a one-line-per-problem error
    assert r["check_rc"] == 1 and text in r["check_out"], r["check_out"]
    assert r["strict_rc"] == 2 and text in r["strict_err"]
    assert r["strict_load"] is not None and text in r["strict_load"]
    cohort = r["cohort"]
    splits = r["splits"]
    if outcome == "exclude":
        for pid in victims:
            assert f"{pid}: excluded: " in r["check_out"]
            assert pid in cohort.excluded and pid not in cohort.cases
            for command in ("load", "train", "predict", "evaluate"):
                assert f"case {pid} excluded" in r[f"{command}_warnings"], (command, r[f"{command}_warnings"])
        assert text in r["load_warnings"]
        assert train_pid not in set(splits["patient_id"])  # never trained on nor validated on
        assert test_pid not in r["predicted"] and test_pid not in r["scored"]
    else:
        assert text in r["load_warnings"]
        assert train_pid in set(splits["patient_id"])
        assert test_pid in r["predicted"] and test_pid in r["scored"]
    assert set(healthy_test) <= set(r["predicted"]) and set(healthy_test) <= set(r["scored"])
    assert _fingerprint(root) == before  # the data folder is byte-identical after all five commands


def test_done_when_three_bad_cases_give_three_named_warnings(tiny_root: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """One NaN phase, one shifted-affine phase, one truncated mask: three named warnings, healthy results."""
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    c = load_cohort(root)
    nan_pid, shifted_pid, truncated_pid = c.ids("train")[2], c.ids("train")[3], c.ids("test")[1]
    DEFECTS["image_nan"][1](root, nan_pid)
    DEFECTS["phase_affine"][1](root, shifted_pid)
    DEFECTS["truncated_mask"][1](root, truncated_pid)
    bad = {nan_pid: "NaN/Inf", shifted_pid: "different affine", truncated_pid: "cannot read"}
    before = _fingerprint(root)
    r = run_all_commands(root, tmp_path / "work", capsys, evaluate_predicts=True)
    for pid, why in bad.items():
        assert re.search(rf"{pid}: excluded: .*{why}", r["check_out"])
        for command in ("train", "predict", "evaluate"):
            named = [m for m in r[f"{command}_warnings"].splitlines() if m.startswith(f"case {pid} excluded")]
            assert len(named) == 1 and why in named[0], (command, r[f"{command}_warnings"])
    assert not set(bad) & set(r["splits"]["patient_id"])
    healthy_test = [i for i in c.ids("test") if i not in bad]
    assert r["scored"] == healthy_test
    assert _fingerprint(root) == before


# --------------------------------------------------------------------------------------------------
# the tables cannot drift from the registry
# --------------------------------------------------------------------------------------------------


def _docstring_table() -> dict[str, str]:
    doc = cohort_module.__doc__ or ""
    section = doc[doc.index("defect id"):]
    rows = {}
    for line in section.splitlines()[2:]:
        if line.startswith("="):
            break
        m = re.match(r"^(\w+)\s{2,}.+?\s{2,}(\w+)\s*$", line)
        assert m, line
        rows[m.group(1)] = m.group(2)
    return rows


def _readme_table() -> dict[str, str]:
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*`(\w+)`\s*\|.*\|\s*(exclude|report)\s*\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_docstring_and_readme_tables_match_the_corpus() -> None:
    registry = {k: v[0] for k, v in DEFECTS.items()}
    assert _docstring_table() == registry
    assert _readme_table() == registry


# --------------------------------------------------------------------------------------------------
# beyond one case's files: spacing source, stale predictions, crop fallback, legitimate variants
# --------------------------------------------------------------------------------------------------


def test_one_spacing_source_or_refused(tiny_root: Path, tmp_path: Path) -> None:
    """pixdim z = 0 with an intact sform: nibabel's zooms say 1 mm, MONAI's loader (training) the sform's
    spacing. The case must be refused, and every kept case measured with one spacing everywhere."""
    from monai.transforms import LoadImage

    from divaware.evaluate import load_mask

    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    victim = load_cohort(root).ids("test")[0]
    DEFECTS["pixdim_zero_sform_intact"][1](root, victim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = load_cohort(root)
    loader = LoadImage(reader="NibabelReader", image_only=True)
    for pid in c.ids("test"):
        case = c.cases[pid]
        monai_spacing = np.linalg.norm(np.asarray(loader(str(case.image_paths[0])).affine)[:3, :3], axis=0)
        scored_spacing = load_mask(Path(case.mask_path))[1]
        cohort_spacing = c.geometry.loc[pid, ["spacing_x", "spacing_y", "spacing_z"]].to_numpy(dtype=float)
        np.testing.assert_allclose(scored_spacing, monai_spacing, rtol=1e-5, err_msg=pid)
        np.testing.assert_allclose(cohort_spacing, monai_spacing, rtol=1e-5, err_msg=pid)
    assert victim not in c.cases and "disagrees with its affine" in " ".join(c.excluded[victim])


@pytest.fixture(scope="module")
def trained(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A private copy of the tiny cohort and a one-epoch run trained on it."""
    from divaware.train import train

    work = tmp_path_factory.mktemp("trained")
    root = work / "data"
    shutil.copytree(tiny_root, root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_train_config(root, work / "run"))
    return root, work / "run"


def test_evaluate_never_reuses_stale_predictions(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    from divaware.evaluate import evaluate

    root0, run0 = trained
    root, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(root0, root)
    shutil.copytree(run0, run)
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(root0), str(root)))
    kw = {"split": "test", "n_boot": 10, "min_support": 0.3, "verbose": False, "cpu_threads": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = evaluate(run, root, **kw)
    preds = first.predictions
    stamps = {p.name: p.stat().st_mtime_ns for p in preds.glob("*.nii.gz")}
    changed = first.per_case.index[0]
    path = _phase(root, changed, 1)  # the image changes in place: same path, new content
    arr = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
    _rewrite(path, arr * 1.5)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        evaluate(run, root, **kw)
    assert re.search(rf"changed since they were predicted.*{changed}", _messages(rec)), _messages(rec)
    after = {p.name: p.stat().st_mtime_ns for p in preds.glob("*.nii.gz")}
    assert after[f"{changed}.nii.gz"] != stamps[f"{changed}.nii.gz"]  # predicted again
    assert all(after[n] == t for n, t in stamps.items() if n != f"{changed}.nii.gz")  # the rest reused
    # another best.pt (same path): every case is predicted again
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, run / "best.pt")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        evaluate(run, root, **kw)
    assert "checkpoint_sha256 changed" in _messages(rec)
    assert all(p.stat().st_mtime_ns != after[p.name] for p in preds.glob("*.nii.gz"))


def test_crop_to_breast_keeps_going_without_a_usable_box(tiny_root: Path, tmp_path: Path) -> None:
    """A bad patient JSON and a breast box beside the tumour: the run trains, both cases on the whole volume."""
    from divaware import data as D
    from divaware.train import train

    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    c = load_cohort(root)
    bad_json, no_tumour = c.ids("train")[1], c.ids("train")[2]
    (root / "patient_info_files" / f"{bad_json.lower()}.json").write_text("{not json")
    _box_without_tumour(root, no_tumour)
    cfg = _train_config(root, tmp_path / "run").with_values(crop_to_breast=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        train(cfg)
        cohort = load_cohort(root)
    text = _messages(rec)
    assert re.search(rf"whole volume.*{bad_json} \(no usable", text) and re.search(rf"{no_tumour} \(breast box", text)
    assert f"{no_tumour}: patient_info_files/{no_tumour.lower()}.json: breast box" in "\n".join(cohort.problems)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = D.make_records(cohort, [bad_json, no_tumour, c.ids("train")[3]], cfg.data_spec())
    shape = tuple(int(v) for v in cohort.geometry.loc[no_tumour, ["nx", "ny", "nz"]])
    assert records[1][D.BOX] == [0, shape[0], 0, shape[1], 0, shape[2]]  # the label keeps its tumour
    assert records[2][D.BOX] != [0, shape[0], 0, shape[1], 0, shape[2]]  # a good box is used as before


def test_mask_with_a_trailing_singleton_axis_is_accepted(tiny_root: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A (X, Y, Z, 1) mask is one 3-D mask: kept, trained on, predicted and scored in every command."""
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    train_pid, test_pid = _victims(root)
    for pid in (train_pid, test_pid):
        _rewrite(_mask(root, pid), _mask_array(root, pid).astype(np.uint8)[..., None])
    r = run_all_commands(root, tmp_path / "work", capsys)
    assert train_pid in r["cohort"].cases and test_pid in r["cohort"].cases
    assert "has shape" not in r["check_out"] and "problems: 0" in r["check_out"]
    assert train_pid in set(r["splits"]["patient_id"]) and test_pid in r["scored"]


# --------------------------------------------------------------------------------------------------
# faults outside the data: one line, the path named, nothing half-written
# --------------------------------------------------------------------------------------------------


def _one_line(rc: int, err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("divaware ")]  # not the progress bars
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_damaged_best_pt_is_one_line_in_predict_and_evaluate(trained: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root, run0 = trained
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    (run / "best.pt").write_bytes((run / "best.pt").read_bytes()[:300])
    rc = cli_main(["predict", "--run", str(run), "--data", str(root), "--out", str(tmp_path / "p"), "--cpu-threads", "1"])
    _one_line(rc, capsys.readouterr().err, "best.pt is damaged", "--checkpoint last")
    rc = cli_main(["evaluate", "--run", str(run), "--data", str(root), "--n-boot", "5"])
    _one_line(rc, capsys.readouterr().err, "best.pt is damaged")


def test_evaluate_without_best_pt_says_last_pt_was_used(trained: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from divaware.evaluate import load_evaluation

    root, run0 = trained
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    (run / "best.pt").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli_main(["evaluate", "--run", str(run), "--data", str(root), "--n-boot", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "(checkpoint best)" not in out
    assert "(checkpoint best asked, best.pt absent: last.pt used)" in out, out
    assert load_evaluation(run).settings["checkpoint_file"] == "last.pt"


@pytest.mark.parametrize(("argv", "words"), [
    (["--cpu-threads", "-3"], "cpu_threads must be a whole number >= 0"),
    (["--device", "nonsense"], "'nonsense' is not a device"),
    (["--device", "cuda:x"], "'cuda:x' is not a device"),
    (["--sliding-window", "--roi", "0", "0", "0"], "roi_size must be 3 window sizes >= 1"),
    # grew to 21 GB and was killed by the out-of-memory killer: refused by the memory estimate first
    (["--sliding-window", "--roi", "999", "999", "999"], "a sliding window of 999x999x999 needs about"),
])
def test_bad_predict_arguments_are_one_line(trained: tuple[Path, Path], tmp_path: Path, argv: list[str],
                                            words: str, capsys: pytest.CaptureFixture[str]) -> None:
    root, run = trained
    rc = cli_main(["predict", "--run", str(run), "--data", str(root), "--out", str(tmp_path / "p"), *argv])
    _one_line(rc, capsys.readouterr().err, words)


def test_evaluate_bad_device_is_one_line(trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    root, run0 = trained
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    rc = cli_main(["evaluate", "--run", str(run), "--data", str(root), "--device", "nonsense", "--n-boot", "5"])
    _one_line(rc, capsys.readouterr().err, "'nonsense' is not a device")


def _read_only_under(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make every mkdir/file creation under ``folder`` fail with EROFS, as on a read-only mount."""
    import errno
    import os

    real_mkdir, real_open = Path.mkdir, os.open

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if Path(self).absolute().is_relative_to(folder):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    def os_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if Path(os.fsdecode(path)).absolute().is_relative_to(folder) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)


@pytest.mark.parametrize("command", ["train", "predict"])
def test_read_only_out_dir_is_one_line(trained: tuple[Path, Path], tmp_path: Path, command: str,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    root, run = trained
    ro = tmp_path / "ro"
    if command == "train":
        cfg = tmp_path / "cfg.yaml"
        c = _train_config(root, ro / "run")
        c.to_yaml(cfg)
        argv = ["train", "--config", str(cfg)]
    else:
        argv = ["predict", "--run", str(run), "--data", str(root), "--out", str(ro / "pred"), "--cpu-threads", "1"]
    _read_only_under(monkeypatch, ro)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli_main(argv)
    _one_line(rc, capsys.readouterr().err, "read-only file system", str(ro))


def _small_full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(10 * 1024**2, 10 * 1024**2, 0))


def test_full_disk_in_predict_names_the_file_and_leaves_no_partial(
        trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    root, run = trained
    real_save = nib.save

    def save(img: object, path: object) -> None:
        Path(path).write_bytes(b"\x1f\x8b partial")  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", save)
    _small_full_disk(monkeypatch)
    out = tmp_path / "pred"
    rc = cli_main(["predict", "--run", str(run), "--data", str(root), "--out", str(out), "--cpu-threads", "1"])
    err = capsys.readouterr().err
    _one_line(rc, err, "disk full writing", str(out / "pred_segmentations"), "0 B free of 10.0 MiB")
    assert not [p.name for p in (out / "pred_segmentations").iterdir()]  # the hidden partial file was removed
    monkeypatch.setattr(nib, "save", real_save)


def test_full_disk_in_evaluate_names_the_file_and_leaves_no_partial(
        trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import divaware.evaluate as E
    from divaware.predict import predict

    root, run0 = trained
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = predict(run, root, split="test", out_dir=tmp_path / "pred", progress=False, cpu_threads=1)

    from divaware import runfolder as R

    def full_write(path: Path, text: str) -> Path:  # the evaluation's atomic writes hit a full disk
        def write(tmp: Path) -> None:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return R.atomic_write(path, write)

    import divaware.report as RP

    monkeypatch.setattr(E, "write_text", full_write)
    monkeypatch.setattr(RP, "write_text", full_write)  # the report's files are written by report.ReportFolder
    _small_full_disk(monkeypatch)
    rc = cli_main(["evaluate", "--run", str(run), "--data", str(root), "--predictions", str(pred), "--n-boot", "5"])
    err = capsys.readouterr().err
    _one_line(rc, err, "disk full writing", str(run / "evaluation_test"), "0 B free of 10.0 MiB")
    assert not list((run / "evaluation_test").glob(".*.tmp"))
