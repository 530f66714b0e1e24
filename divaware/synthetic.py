"""A synthetic MAMA-MIA stand-in: same folder layout, file names, spreadsheet and quirks, invented patients.

The real MAMA-MIA data cannot be downloaded here, so :func:`make_cohort` writes a cohort that the loader
(:func:`divaware.cohort.load_cohort`) reads with no special case. Synthetic results illustrate the method;
they are not MAMA-MIA results.

Layout written (exactly the real one, see DESIGN.md)::

    <root>/images/DUKE_001/duke_001_0000.nii.gz ...   # upper-case folder, lower-case files, 3-6 phases
    <root>/images/DUKE_001/duke_001.tsv                # stray non-NIfTI file in some folders (a real quirk)
    <root>/segmentations/expert/DUKE_001.nii.gz        # binary uint8 tumour mask
    <root>/segmentations/automatic/duke_001.nii.gz     # an imperfect "automatic" mask
    <root>/patient_info_files/duke_001.json            # clinical_data / primary_lesion / imaging_data
    <root>/clinical_and_imaging_info.xlsx              # sheet "dataset_info", the 49 real columns + breast_density
    <root>/train_test_splits.csv                       # train_split, test_split (NaN-padded)
    <root>/synthetic_truth.csv                         # latent factors per case; not part of MAMA-MIA
    <root>/synthetic_truth/lesions/ISPY2_123456.nii.gz # look-alike mechanisms: each hard case's lesion labels

Causal story (every disparity comes from image content; the mask is the tumour geometry and is never
altered per subgroup):

* collection (DUKE/ISPY1/ISPY2/NACT in the real proportions 291/171/980/64) -> site -> scanner
  (manufacturer, field strength), which sets the raw integer intensity scale, noise, bias-field
  strength, slice thickness / partial volume and the DCE timing;
* age (per-collection distribution) -> menopause (logistic in age, peri counted as pre);
  age, BMI and menopause -> breast density a-d (younger, leaner, premenopausal -> denser);
* density -> volume of fibroglandular tissue (FGT) inside a lobe-shaped breast of fat;
* age, menopause and density -> background parenchymal enhancement (BPE) of the FGT: a diffuse slow,
  persistent rise plus nodular foci the size of small tumours, strong only in young premenopausal dense
  breasts. The foci rise fast enough to look like small tumours over the first minutes; only their
  continued rise (tumours wash out or plateau), their shape and size tell them apart;
* the tumour: lobulated (union of ellipsoids with a wavy surface), log-normal volume (DUKE smallest),
  preferentially inside FGT, fast uptake then washout or plateau.

The *hard subgroup* is age <= 40, premenopausal, density c/d (about 13 % of cases): its marked BPE gives a
small model false positives and blurs tumour borders. ``synthetic_truth.csv`` records it per case together
with the latent factors, so tests and notebooks can check what a method found; the loader ignores the file.

Presets
-------
``default`` (CPU-sized, 300 cases): every case is an axial single-breast crop of 48 x 48 x 32 voxels
(~2.5 x 2.5 x 2.6-3.6 mm; 73,728 voxels), generated in well under a minute on 2 cores. Collections differ in
intensity scale, noise, bias field, slice thickness (spacing + partial-volume blur) and timing, not in
shape. Tumours have a median of ~4.5 ml (DUKE ~2.5 ml; at least 1.2 ml), i.e. a median of ~230 voxels
(5th-95th percentile ~70-830): about 0.3 % of the volume against 0.15 % in the real data, because a
48 x 48 x 32 crop holds one breast, not the whole chest; at the real relative size a tumour would be a few
dozen voxels and hardly learnable by a small network.

``realistic`` (12 cases unless asked): the real collections' geometry -- DUKE axial bilateral 448/512
in-plane x 144-200 slices, ISPY2 axial bilateral 256-512 x 80-200, ISPY1 sagittal unilateral 256 x 256 x
44-64, NACT 256 x 256 x 56-64 -- with real spacings (0.6-0.94 mm in-plane, 0.8-3.4 mm slices) and tumours of
median ~10 ml (5th-95th percentile ~2-60 ml, DUKE smallest). The scene is rendered on a coarse grid (<= 128
in-plane) and upsampled, and phases are written one at a time: a DUKE-sized case takes ~20-30 s on 2 cores,
~1.2 GB of RAM and ~175 MB of disk. It is meant for loader and GPU benchmarks, not for training on a CPU.

Disparity mechanisms (``disparity``)
-----------------------------------
The hard subgroup (age <= 40, premenopausal, density c/d; ~13 %) is the same patients in every mechanism; what
makes it hard differs:

``default`` (the original generator, byte for byte): BPE foci, strongest in the hard subgroup but present in
other premenopausal women too, rise fast and keep rising slowly; tumours wash out (60 %) or plateau (40 %).
In phases 0-2 (what the default model sees) a focus and a plateau tumour look much alike, so much of the gap
may be irreducible for such a model.

``representation``: tumour-sized look-alike foci occur *only* in the hard subgroup (2 + Poisson(2) per case).
At the second post-contrast phase they are as bright as a tumour, but they get there by a steady linear rise,
so at the first post-contrast phase they are only about half as bright (phase 2 is 1.5-3x phase 1, median
~2x) while tumours have nearly peaked (<= 1.35x). The cue is in the phases the model sees and learnable,
but a rare subgroup contributes little to an unweighted loss: over-weighting it should help. A positive
control. (A first version made the foci rise to ~2x a tumour's brightness at phase 2, like vessels, which a
model trained on the majority already rejects: ERM's gap was 0.04. Measured on this version, 5 seeds and an
800-case held-out cohort: ERM's hard-vs-rest gap 0.079, of which even the oracle closes only 22 %, so it is a
weak positive control; see benchmarks/EXPERIMENT.md.)

``lookalike`` (the positive control): the hard subgroup's BPE is brought down to the level of other dense
premenopausal women (no extra diffuse BPE, so its parenchyma no longer hides tumours), and each hard case holds
4 + Poisson(3) look-alike lesions (radius 4-9 mm, centred in parenchyma, never touching the tumour) that match
the tumour -- pre-contrast signal and enhancement -- at phases 0-1 and lose 50-70 % of their enhancement by
phase 2, where tumours lose <= 30 %. The cue is in the phases the model sees, and only ~13 % of the cases carry
it. The rest's images are the ``default`` cohort's, byte for byte. ``lookalike_weak`` (the dose control) has the
same lesions with a 30-45 % drop. ``counterfactual=True`` renders the same patients with the same seed without
drawing the lesions: every file of a case without lesions is identical, a hard case differs only inside (and
within partial volume of) its lesions. ``synthetic_truth.csv`` records ``n_lesions``, ``lesion_radii_mm`` and
``counterfactual``; ``synthetic_truth/lesions/<ID>.nii.gz`` labels each hard case's lesions 1..n (also in the
counterfactual cohort: where they would be), so an evaluation can count false positives inside them.
(A prototype outside the package: 2 + Poisson(2) lesions cost ERM 0.065 hard-group Dice, of which the oracle
recovered 40 %; 4 + Poisson(3), used here, 0.123 and 53 %.)

``intrinsic``: no foci anywhere; instead 35-55 % of every hard-subgroup tumour (a cap cut by a random plane)
does not enhance as tumour: it has the look and the kinetics of the surrounding parenchyma (ambiguous
borders). The expert mask still covers the whole tumour, and nothing in the image tells where that part
ends, so no weighting can recover it. A negative control.

Mechanisms are small objects (:class:`Mechanism` and its subclasses, :data:`MECHANISMS`); the scene is built in
named pieces (breast shape, body, parenchyma, tumour, foci, lesions, vessels, composition). Mechanism-specific
draws use their own random streams, so every mechanism has the same patients, scanners and tumour geometry;
only the foci, lesions and the tumour's appearance differ. ``default``, ``representation`` and ``intrinsic``
cohorts are byte-identical to those of the generator before that split (tests/synthetic_hashes.json).

Other options: ``hard_fraction`` (e.g. 0.5) draws a cohort of the same size whose hard subgroup is that share of
the cases -- more distinct hard patients from a larger cohort of the same generator (the ``balanced`` data
ceiling); ``tumour_appearance`` ``necrotic`` or ``rim`` gives the hard subgroup's tumours a non-enhancing
(darker) core or a weakly, slowly enhancing core under an enhancing rim (25-45 % of the tumour, its deepest
voxels); the expert mask still covers the whole tumour.

Missingness
-----------
``teaching`` (default): breast density reported for ~92 % of cases; menopause unknown for all of ISPY1
and NACT (as in the real data) and ~3 % elsewhere. ``realistic``: density only for ~60/291 of DUKE (~96 %
missing overall) and menopause unknown for ~27 % (all ISPY1 and NACT, ~5 % DUKE, ~15 % ISPY2).

Determinism: the same arguments give byte-identical files (NIfTI gzip streams are written with mtime 0,
the xlsx zip with fixed timestamps). Conventions: ``breast_coordinates`` follow the organisers' code --
``x`` indexes SimpleITK array axis 0 (= NIfTI axis k), ``y`` axis j, ``z`` NIfTI axis i; upper bounds
exclusive.
"""

from __future__ import annotations

import datetime as _dt
import functools
import gzip
import io
import json
import math
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

PRESETS = ("default", "realistic")
# How the hard subgroup's disadvantage arises (see "Disparity mechanisms" in the module docstring).
DISPARITIES = ("default", "representation", "intrinsic", "lookalike", "lookalike_weak")
# How the hard subgroup's tumours look (``tumour_appearance``): necrotic core or rim enhancement, hard subgroup only.
TUMOUR_APPEARANCES = ("default", "necrotic", "rim")
MISSINGNESS = ("teaching", "realistic")
COLLECTIONS = ("DUKE", "ISPY1", "ISPY2", "NACT")
REAL_COUNTS = {"DUKE": 291, "ISPY1": 171, "ISPY2": 980, "NACT": 64}
DEFAULT_N_CASES = {"default": 300, "realistic": 12}
DEFAULT_SHAPE = (48, 48, 32)
TRUTH_FILE = "synthetic_truth.csv"
# Label maps of the look-alike lesions (1..n per case), outside the MAMA-MIA layout so no loader sees them.
LESION_DIR = "synthetic_truth/lesions"
SHEET = "dataset_info"

# The 49 columns of the real clinical_and_imaging_info.xlsx, in their order, with the challenge release's
# breast_density after menopause.
SPREADSHEET_COLUMNS = (
    "patient_id", "dataset", "bilateral_breast_cancer", "multifocal_cancer", "nac_agent", "endocrine_therapy",
    "anti_her2_neu_therapy", "pcr", "mastectomy_post_nac", "days_to_follow_up", "days_to_recurrence",
    "days_to_metastasis", "days_to_death", "hr", "er", "pr", "her2", "mammaprint", "oncotype_score",
    "nottingham_grade", "tumor_subtype", "age", "menopause", "breast_density", "ethnicity", "has_implant",
    "weight", "patient_size", "bmi_group", "view", "bilateral_mri", "num_phases", "fat_suppressed",
    "field_strength", "image_rows", "image_columns", "num_slices", "pixel_spacing", "slice_thickness", "site",
    "manufacturer", "scanner_model", "high_bit", "window_center", "window_width", "echo_time",
    "repetition_time", "acquisition_times", "acquisition_date", "tcia_series_uid",
)

# Real value spellings of the menopause column (the I-SPY2 long forms are verbatim).
MENOPAUSE_PRE_LONG = "pre (<6 months since LMP AND no prior bilateral ovariectomy AND not on estrogen replacement)"
MENOPAUSE_PERI_LONG = "peri (6-12 months since LMP AND no prior bilateral ovariectomy AND not on estrogen replacement)"

# Ordinal density model: latent = -0.025 (age-50) - 0.04 (BMI-28) + 0.2 pre + N(0,1), cut at these points,
# giving roughly a/b/c/d = 10/40/38/12 %, dense (c/d) in ~68 % of women <= 40 and ~30 % of those > 60.
_DENSITY_CUTS = (-1.085, 0.267, 1.504)
_FGT_FRACTION = {"a": (0.04, 0.10), "b": (0.10, 0.22), "c": (0.22, 0.40), "d": (0.40, 0.58)}
_BPE_DENSITY = {"a": 0.15, "b": 0.4, "c": 0.85, "d": 1.0}

_VENDORS = {
    # manufacturer: (scanner models (real spellings incl. trailing spaces), high_bit, intensity scale range)
    "GE": (("Signa HDxt", "SIGNA HDx ", "Optima MR450w ", "DISCOVERY MR750", "Signa Excite"), 15, (450.0, 1300.0)),
    "SIEMENS": (("Avanto", "Skyra ", "TrioTim", "Verio", "Aera"), 11, (160.0, 480.0)),
    "Philips": (("Achieva", "Ingenia", "Intera"), 11, (90.0, 260.0)),
}


@dataclass(frozen=True)
class _Collection:
    """Acquisition protocol and population of one collection (values modelled on the real collections)."""

    name: str
    id_format: str
    id_range: tuple[int, int]
    age: tuple[float, float]  # mean, sd
    n_sites: int  # scanner units; the site column is NaN when the collection is single-site
    named_sites: bool
    vendors: dict[str, float]
    field_3t: float  # probability that a site is 3 T
    phases: dict[int, float]
    first_delay: tuple[float, float]  # s after injection of the first post-contrast phase
    interval: tuple[float, float]  # s between post-contrast phases
    fat_suppressed: float
    default_spacing: tuple[float, float]  # in-plane, slice (mm) in the default preset
    z_blur: float  # partial-volume blur across slices (voxels)
    noise: tuple[float, float]  # noise sd relative to the intensity scale
    view: str
    bilateral: bool
    real_inplane: dict[int, float]
    real_slices: tuple[int, int]
    real_pixel: tuple[float, float]
    real_thickness: tuple[float, ...]
    menopause_style: str  # "short" (pre/post), "long" (I-SPY2 long forms) or "none" (all NaN)
    menopause_missing: dict[str, float]
    density_known: dict[str, float]
    tumour_scale: float


_COLLECTIONS: dict[str, _Collection] = {
    "DUKE": _Collection(
        "DUKE", "DUKE_{:03d}", (1, 922), (52.5, 11.0), 2, False, {"GE": 0.6, "SIEMENS": 0.4}, 0.5,
        {3: 0.1, 4: 0.45, 5: 0.35, 6: 0.1}, (120, 200), (100, 135), 0.9, (2.4, 2.6), 0.3, (0.02, 0.035),
        "axial", True, {448: 0.3, 512: 0.7}, (144, 200), (0.66, 0.8), (1.0, 1.1, 1.2), "short",
        {"teaching": 0.03, "realistic": 0.05}, {"teaching": 0.92, "realistic": 60 / 291}, 0.6,
    ),
    "ISPY1": _Collection(
        "ISPY1", "ISPY1_{:d}", (1001, 1230), (48.0, 9.0), 9, True, {"GE": 0.8, "SIEMENS": 0.1, "Philips": 0.1},
        0.0, {3: 1.0}, (140, 170), (270, 320), 1.0, (2.6, 3.4), 0.8, (0.035, 0.055), "sagittal", False,
        {256: 1.0}, (44, 64), (0.7, 0.94), (1.8, 2.0, 2.2, 2.5), "none",
        {"teaching": 1.0, "realistic": 1.0}, {"teaching": 0.92, "realistic": 0.0}, 1.0,
    ),
    "ISPY2": _Collection(
        "ISPY2", "ISPY2_{:06d}", (100001, 999999), (49.0, 10.5), 22, True,
        {"GE": 0.45, "SIEMENS": 0.35, "Philips": 0.2}, 0.55, {3: 0.05, 4: 0.15, 5: 0.3, 6: 0.5}, (80, 110),
        (80, 110), 0.95, (2.5, 3.0), 0.5, (0.025, 0.05), "axial", True,
        {256: 0.1, 320: 0.1, 384: 0.2, 448: 0.2, 512: 0.4}, (80, 200), (0.6, 0.9), (0.8, 1.0, 1.2, 1.5, 2.0),
        "long", {"teaching": 0.03, "realistic": 0.15}, {"teaching": 0.92, "realistic": 0.0}, 1.0,
    ),
    "NACT": _Collection(
        "NACT", "NACT_{:02d}", (1, 99), (48.0, 10.0), 1, False, {"GE": 1.0}, 0.0, {3: 0.7, 4: 0.3},
        (140, 170), (250, 300), 0.85, (2.6, 3.6), 0.9, (0.03, 0.05), "sagittal", False, {256: 1.0}, (56, 64),
        (0.7, 0.8), (2.0, 2.5, 3.0, 3.4), "none", {"teaching": 1.0, "realistic": 1.0},
        {"teaching": 0.92, "realistic": 0.0}, 1.0,
    ),
}

_NAC_AGENTS = ("Paclitaxel", "Paclitaxel + Neratinib", "Paclitaxel + Pembrolizumab", "Paclitaxel + MK-2206",
               "Paclitaxel + Ganitumab", "Paclitaxel + Ganetespib", "T-DM1 + Pertuzumab")
_ETHNICITY = {"caucasian": 0.65, "african american": 0.17, "asian": 0.07, "hispanic": 0.05,
              "native american": 0.01, "hawaian": 0.005, "multiple race": 0.02, None: 0.025}


# --------------------------------------------------------------------------------------------------
# Plan: who the patients are and how they were scanned (no voxels)
# --------------------------------------------------------------------------------------------------


def _check_args(preset: str, missingness: str, n_cases: int | None) -> int:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if missingness not in MISSINGNESS:
        raise ValueError(f"unknown missingness {missingness!r}; choose one of {', '.join(MISSINGNESS)}")
    n = DEFAULT_N_CASES[preset] if n_cases is None else int(n_cases)
    if not 1 <= n <= 5000:
        raise ValueError(f"n_cases must be between 1 and 5000, got {n_cases!r}")
    return n


def _allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder allocation, so that collection sizes follow the real proportions exactly."""
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(math.floor(v)) for k, v in raw.items()}
    order = sorted(raw, key=lambda k: (-(raw[k] - counts[k]), list(weights).index(k)))
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _ids(col: _Collection, k: int, rng: np.random.Generator) -> list[str]:
    lo, hi = col.id_range
    if k > hi - lo + 1:  # more cases than real-looking numbers: widen the range (one more digit)
        hi = lo + 10 * (hi - lo + 1) + k
    numbers = np.sort(rng.choice(np.arange(lo, hi + 1), size=k, replace=False))
    return [col.id_format.format(int(x)) for x in numbers]


def _choice(rng: np.random.Generator, options: dict[Any, float]) -> Any:
    keys = list(options)
    p = np.array([options[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _sites(col: _Collection, rng: np.random.Generator, letter: str) -> list[dict[str, Any]]:
    """Scanner units of a collection: each has its own vendor, field, intensity scale, noise and bias."""
    sites = []
    for s in range(col.n_sites):
        vendor = _choice(rng, col.vendors) if col.n_sites > 1 else next(iter(col.vendors))
        if col.name == "DUKE":  # Duke had one GE and one Siemens unit
            vendor = ("GE", "SIEMENS")[s % 2]
        models, high_bit, (lo, hi) = _VENDORS[vendor]
        field_t = 3.0 if rng.random() < col.field_3t else 1.5
        sites.append({
            "site": f"Site A{letter}{chr(ord('A') + s)}" if col.named_sites else None,
            "manufacturer": vendor,
            "scanner_model": models[int(rng.integers(len(models)))],
            "high_bit": high_bit,
            "field_strength": field_t,
            "scale": float(rng.uniform(lo, hi)),
            "noise": float(rng.uniform(*col.noise)),
            "bias": float(rng.uniform(0.15, 0.3) if field_t > 2 else rng.uniform(0.06, 0.14)),
            "weight": float(rng.gamma(2.0)),
        })
    return sites


def _age_group(age: float) -> str:
    # Same right-closed bins as the challenge (and divaware.cohort): <=40, (40,50], ..., >70.
    for edge, name in ((40, "0-40"), (50, "41-50"), (60, "51-60"), (70, "61-70")):
        if age <= edge:
            return name
    return "71+"


def plan_cohort(n_cases: int | None = None, seed: int = 0, preset: str = "default",
                missingness: str = "teaching", collections: Sequence[str] | None = None,
                disparity: str = "default", *, counterfactual: bool = False, hard_fraction: float | None = None,
                tumour_appearance: str = "default") -> pd.DataFrame:
    """The cohort :func:`make_cohort` would write, one row per case, without any voxels.

    Holds the latent truth (``age``, ``menopause_true``, ``density_true``, ``hard_subgroup``,
    ``bpe_strength``, ``n_foci``, ``tumour_ml_target``, ``kinetics`` ...), the reported values as they go into
    the spreadsheet (``menopause_reported``, ``density_reported``) and the acquisition (site, scanner,
    phases, timing, shape, spacing). Cheap: use it to look at distributions for many cases.
    ``disparity`` (one of :data:`DISPARITIES`) sets how the hard subgroup is disadvantaged (module docstring);
    ``counterfactual`` renders a look-alike mechanism's patients without their lesions; ``hard_fraction``
    (e.g. 0.5) draws a cohort of the same size whose hard subgroup is that share of the cases (more distinct
    hard patients, the balanced data ceiling); ``tumour_appearance`` (:data:`TUMOUR_APPEARANCES`) gives the hard
    subgroup's tumours a necrotic core or a rim-enhancing pattern.
    """
    n = _check_args(preset, missingness, n_cases)
    mechanism = mechanism_of(disparity)
    if counterfactual and not mechanism.has_lesions:
        raise ValueError(f"counterfactual applies to look-alike mechanisms only "
                         f"({', '.join(d for d in DISPARITIES if MECHANISMS[d].has_lesions)}), not {disparity!r}")
    if tumour_appearance not in TUMOUR_APPEARANCES:
        raise ValueError(f"unknown tumour_appearance {tumour_appearance!r}; choose one of "
                         f"{', '.join(TUMOUR_APPEARANCES)}")
    chosen = COLLECTIONS if collections is None else tuple(str(c).upper() for c in collections)
    unknown = [c for c in chosen if c not in _COLLECTIONS]
    if unknown or not chosen:
        raise ValueError(f"unknown collection(s) {unknown or chosen!r}; choose from {', '.join(COLLECTIONS)}")
    if hard_fraction is None:
        plan, rng = _plan_rows(n, seed, preset, missingness, chosen)
    else:
        plan, rng = _plan_with_hard_fraction(n, seed, preset, missingness, chosen, float(hard_fraction))
    # Per-collection 80/20 split, like the challenge's 1,200/306.
    split = pd.Series("train", index=plan.index)
    for _, grp in plan.groupby("dataset", sort=False):
        ids = grp.index.to_numpy()
        n_test = int(round(0.2 * len(ids))) if len(ids) >= 3 else 0
        split[rng.choice(ids, size=n_test, replace=False)] = "test"
    plan["split"] = split
    plan = mechanism.apply(plan, int(seed), counterfactual)
    return _apply_appearance(plan, int(seed), tumour_appearance)


def _plan_rows(n: int, seed: int, preset: str, missingness: str,
               chosen: Sequence[str]) -> tuple[pd.DataFrame, np.random.Generator]:
    """The patients and their scans (no split, no mechanism), and the plan stream for the split after them."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
    counts = _allocate(n, {c: REAL_COUNTS[c] for c in COLLECTIONS if c in chosen})
    rows: list[dict[str, Any]] = []
    for ci, name in enumerate(COLLECTIONS):
        col = _COLLECTIONS[name]
        # Sites are drawn for every collection, chosen or not, so a subset keeps the same scanners.
        sites = _sites(col, rng, "ABCD"[ci])
        k = counts.get(name, 0)
        if k == 0:
            continue
        weights = np.array([s["weight"] for s in sites])
        for pid in _ids(col, k, rng):
            rows.append(_plan_case(pid, col, sites[int(rng.choice(len(sites), p=weights / weights.sum()))],
                                   rng, preset, missingness))
    plan = pd.DataFrame(rows)
    plan.index = pd.Index(plan["patient_id"], name="patient_id")
    return plan, rng


def _plan_with_hard_fraction(n: int, seed: int, preset: str, missingness: str, chosen: Sequence[str],
                             hard_fraction: float) -> tuple[pd.DataFrame, np.random.Generator]:
    """``n`` cases of which ``round(hard_fraction * n)`` are in the hard subgroup: drawn from a larger cohort of
    the same generator (so the hard cases are distinct patients, not copies), keeping its row order."""
    if not 0.0 < hard_fraction < 1.0:
        raise ValueError(f"hard_fraction must be between 0 and 1 (exclusive), got {hard_fraction!r}")
    n_hard = int(round(hard_fraction * n))
    big = max(n, int(math.ceil(n_hard / 0.10)))  # the hard subgroup is ~13 % of a cohort
    while True:
        pool, _ = _plan_rows(big, seed, preset, missingness, chosen)
        hard = pool["hard_subgroup"].to_numpy(bool)
        if hard.sum() >= n_hard and (~hard).sum() >= n - n_hard:
            break
        if big >= 50_000:
            raise ValueError(f"hard_fraction {hard_fraction} of {n} cases needs more hard patients than a "
                             f"{big}-case cohort of collections {list(chosen)} holds; lower hard_fraction")
        big *= 2
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    pick_hard = rng.permutation(np.flatnonzero(hard))[:n_hard]
    pick_rest = rng.permutation(np.flatnonzero(~hard))[: n - n_hard]
    return pool.iloc[np.sort(np.concatenate([pick_hard, pick_rest]))].copy(), rng


def _apply_appearance(plan: pd.DataFrame, seed: int, appearance: str) -> pd.DataFrame:
    """Hard-subgroup tumours with a necrotic core or rim enhancement (``core_fraction`` of their voxels).

    Nothing (no column, no draw) for ``default``, so that cohort is the original one byte for byte.
    """
    if appearance == "default":
        return plan
    rng = np.random.default_rng(np.random.SeedSequence([seed, 6, TUMOUR_APPEARANCES.index(appearance)]))
    hard = plan["hard_subgroup"].to_numpy(bool)
    plan["tumour_appearance"] = np.where(hard, appearance, "default")
    plan["core_fraction"] = np.where(hard, np.round(rng.uniform(0.25, 0.45, len(plan)), 4), 0.0)
    return plan


def _plan_geometry(col: _Collection, rng: np.random.Generator, preset: str) -> tuple[Any, ...]:
    """The case's grid and target tumour volume: (shape, spacing, view, bilateral, rows, cols, slices,
    tumour_ml); draws from ``rng`` in the order the case plan always has."""
    if preset == "default":
        inplane, thick = col.default_spacing
        inplane = round(inplane * float(rng.uniform(0.96, 1.04)), 4)
        shape = DEFAULT_SHAPE  # written array (canonical x=LR, y=AP, z=SI)
        spacing = (inplane, inplane, thick)
        view, bilateral = "axial", False
        rows, cols, slices = shape[1], shape[0], shape[2]
        tumour_ml = float(np.clip(5.0 * col.tumour_scale * math.exp(rng.normal(0, 0.7)), 1.2, 35.0))
    else:
        size = int(_choice(rng, col.real_inplane))
        pixel = round(float(rng.uniform(*col.real_pixel)), 4)
        thick = float(col.real_thickness[int(rng.integers(len(col.real_thickness)))])
        if col.view == "axial":
            # slices cover ~150-200 mm superior-inferior
            slices = int(np.clip(round(rng.uniform(150, 200) / thick), *col.real_slices))
            slices = int(np.clip(slices, 44, 256))
            shape = (size, size, slices)
            spacing = (pixel, pixel, thick)
        else:
            slices = int(rng.integers(col.real_slices[0], col.real_slices[1] + 1))
            shape = (size, size, slices)  # written array: (AP, SI, LR slices)
            spacing = (pixel, pixel, thick)
        view, bilateral = col.view, col.bilateral
        rows, cols = size, size
        tumour_ml = float(np.clip(11.0 * col.tumour_scale * math.exp(rng.normal(0, 1.05)), 0.5, 150.0))
    return shape, spacing, view, bilateral, rows, cols, slices, tumour_ml


def _plan_case(pid: str, col: _Collection, site: dict[str, Any], rng: np.random.Generator, preset: str,
               missingness: str) -> dict[str, Any]:
    age = float(np.clip(np.round(rng.normal(*col.age)), 23, 89))
    bmi = float(np.clip(rng.normal(28.0, 5.5), 17.0, 50.0))
    pre = bool(rng.random() < 1.0 / (1.0 + math.exp((age - 51.0) / 2.8)))
    peri = pre and 44 <= age <= 56 and rng.random() < 0.25
    latent = -0.025 * (age - 50) - 0.04 * (bmi - 28) + 0.2 * pre + rng.normal()
    density = "abcd"[int(np.searchsorted(_DENSITY_CUTS, latent))]
    hard = bool(age <= 40 and pre and density in "cd")
    young = 1.0 if age <= 40 else 0.55 if age <= 45 else 0.4 if age <= 50 else 0.3
    bpe = float(np.clip(0.08 + 0.9 * pre * young * _BPE_DENSITY[density] + rng.normal(0, 0.07), 0.0, 1.0))
    n_foci = int(rng.poisson(7.0 * max(0.0, bpe - 0.35)))

    # Reported values, with the collection's spelling and missingness.
    if col.menopause_style == "none" or rng.random() < col.menopause_missing[missingness]:
        meno_reported = None
    elif col.menopause_style == "long":
        meno_reported = MENOPAUSE_PERI_LONG if peri else MENOPAUSE_PRE_LONG if pre else "post"
    else:
        meno_reported = "pre" if pre else "post"
    density_reported = density if rng.random() < col.density_known[missingness] else None
    age_reported = None if (missingness == "realistic" and rng.random() < 0.005) else age

    n_phases = int(_choice(rng, col.phases))
    t1 = float(rng.uniform(*col.first_delay))
    step = float(rng.uniform(*col.interval))
    times = [0] + [int(round(t1 + i * step)) for i in range(n_phases - 1)]

    shape, spacing, view, bilateral, rows, cols, slices, tumour_ml = _plan_geometry(col, rng, preset)

    hr_pos = rng.random() < 0.6
    her2 = int(rng.random() < 0.25)
    er = int(hr_pos and rng.random() < 0.95)
    pr_ = int(hr_pos and (not er or rng.random() < 0.8))
    if hr_pos:
        subtype = "her2_enriched" if her2 else ("luminal" if col.name == "ISPY1" else
                                                 ("luminal_a" if rng.random() < 0.55 else "luminal_b"))
    else:
        subtype = "her2_pure" if her2 else "triple_negative"
    weight_kg = None if rng.random() < 0.2 else round(bmi * float(rng.normal(1.63, 0.06)) ** 2, 2)
    height = None if weight_kg is None else round(math.sqrt(weight_kg / bmi), 4)
    bmi_group = None if weight_kg is None else (
        "underweight" if bmi < 18.5 else "normal" if bmi < 25 else "overweight" if bmi < 30
        else "obesity_class_1" if bmi < 35 else "obesity_class_2" if bmi < 40 else "obesity_class_3")
    pcr = None if rng.random() < 0.05 else int(rng.random() < (0.45 if not hr_pos else 0.2))
    date = None
    if col.name != "DUKE":
        d = _dt.date(1984, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 3650)))
        date = d.strftime("%Y/%m/%d")
    scale = site["scale"] * float(rng.uniform(0.85, 1.15))
    return {
        "patient_id": pid,
        "dataset": col.name,
        "preset": preset,
        "age": age,
        "age_reported": age_reported,
        "age_group_true": _age_group(age),
        "bmi": bmi,
        "menopause_true": "pre" if pre else "post",
        "peri": peri,
        "menopause_reported": meno_reported,
        "density_true": density,
        "density_reported": density_reported,
        "hard_subgroup": hard,
        "bpe_strength": bpe,
        "n_foci": n_foci,
        "tumour_ml_target": tumour_ml,
        "kinetics": "washout" if rng.random() < 0.6 else "plateau",
        "site": site["site"],
        "manufacturer": site["manufacturer"],
        "scanner_model": site["scanner_model"],
        "high_bit": site["high_bit"],
        "field_strength": site["field_strength"],
        "intensity_scale": scale,
        "noise_rel": site["noise"] * float(rng.uniform(0.9, 1.1)),
        "bias_amplitude": site["bias"],
        "z_blur": col.z_blur,
        "fat_suppressed": int(rng.random() < col.fat_suppressed),
        "num_phases": n_phases,
        "acquisition_times": times,
        "view": view,
        "bilateral": bilateral,
        "shape": tuple(int(s) for s in shape),
        "spacing": tuple(float(s) for s in spacing),
        "image_rows": rows,
        "image_columns": cols,
        "num_slices": slices,
        "echo_time": round(float(rng.uniform(1.2, 2.8)), 3),
        "repetition_time": round(float(rng.uniform(3.5, 7.0)), 3),
        "er": er, "pr": pr_, "hr": int(hr_pos), "her2": her2, "tumor_subtype": subtype, "pcr": pcr,
        "weight": weight_kg, "patient_size": height, "bmi_group": bmi_group,
        "ethnicity": _choice(rng, _ETHNICITY),
        "nac_agent": _NAC_AGENTS[int(rng.integers(len(_NAC_AGENTS)))] if col.name == "ISPY2" else None,
        "acquisition_date": date,
        "tcia_series_uid": "1.3.6.1.4.1.14519.5.2.1." + "".join(str(int(x)) for x in rng.integers(0, 10, 39)),
        "stray_tsv": bool(rng.random() < 0.2),
    }


# --------------------------------------------------------------------------------------------------
# Rendering: tissue maps -> DCE phases and mask
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _noise_gain(shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """Transfer function of a Gaussian filter on the rfft grid of ``shape``."""
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    gain = np.ones([len(f) for f in freqs])
    for a, f in enumerate(freqs):
        gain = gain * np.exp(-2.0 * (np.pi * sigma[a] * f) ** 2).reshape(
            [-1 if b == a else 1 for b in range(len(shape))])
    return gain


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: Sequence[float]) -> np.ndarray:
    """Periodic Gaussian random field with unit sd (correlation sigma in voxels per axis).

    Drawn directly in Fourier space (white coefficients times a Gaussian filter's transfer function): one
    inverse FFT, far cheaper than wide spatial kernels.
    """
    sig = tuple(float(x) for x in np.broadcast_to(np.asarray(sigma, dtype=float), (len(shape),)))
    gain = _noise_gain(tuple(shape), sig)
    coef = rng.standard_normal((2, *gain.shape))
    f = np.fft.irfftn((coef[0] + 1j * coef[1]) * gain, s=shape).astype(np.float32)
    return (f - f.mean()) / (f.std() + 1e-8)


def _soft(d_mm: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Partial-volume fraction of a region from a signed distance (mm, positive inside)."""
    return np.clip(0.5 + d_mm / voxel_mm, 0.0, 1.0).astype(np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


@dataclass
class _Blob:
    """A lobulated object: union of rotated ellipsoids with a wavy surface (tumours and BPE foci)."""

    centres: np.ndarray  # (L, 3) mm
    radii: np.ndarray  # (L, 3) mm
    rotations: np.ndarray  # (L, 3, 3)
    waves: np.ndarray  # (W, 3) frequency vectors
    wave_amp: np.ndarray  # (W,)
    wave_phase: np.ndarray  # (W,)

    def level(self, pts: np.ndarray) -> np.ndarray:
        """<1 inside: min over lobes of the scaled ellipsoid radius, modulated by direction."""
        out = np.full(pts.shape[0], np.inf, dtype=np.float32)
        for c, r, rot in zip(self.centres, self.radii, self.rotations, strict=True):
            d = (pts - c) @ rot
            q = np.sqrt(((d / r) ** 2).sum(axis=1))
            u = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-6)
            mod = 1.0 + (self.wave_amp[None, :] * np.cos(u @ self.waves.T + self.wave_phase[None, :])).sum(1)
            out = np.minimum(out, (q / mod).astype(np.float32))
        return out

    def scaled(self, s: float) -> _Blob:
        c0 = self.centres[0]
        return _Blob(c0 + (self.centres - c0) * s, self.radii * s, self.rotations, self.waves, self.wave_amp,
                     self.wave_phase)

    def bbox(self, pad: float) -> tuple[np.ndarray, np.ndarray]:
        r = self.radii.max(axis=1, keepdims=True) * (1.0 + self.wave_amp.sum()) + pad
        return (self.centres - r).min(axis=0), (self.centres + r).max(axis=0)


def _make_blob(rng: np.random.Generator, centre: np.ndarray, radius: float, n_lobes: int,
               roughness: float) -> _Blob:
    centres = [centre]
    radii = [radius * rng.uniform(0.75, 1.25, 3)]
    for _ in range(n_lobes - 1):
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        centres.append(centre + u * radius * rng.uniform(0.45, 0.75))
        radii.append(radius * rng.uniform(0.4, 0.7) * rng.uniform(0.8, 1.2, 3))
    n_w = 3
    waves = rng.standard_normal((n_w, 3)) * 2.5
    return _Blob(np.array(centres), np.array(radii), np.stack([_random_rotation(rng) for _ in centres]),
                 waves, rng.uniform(0.0, roughness, n_w), rng.uniform(0, 2 * np.pi, n_w))


def _blob_fraction(blob: _Blob, grid: _Grid, mean_radius: float) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Partial-volume fraction of a blob on the bounding-box sub-grid (returned with its slices)."""
    lo, hi = blob.bbox(pad=2 * grid.voxel)
    sl = tuple(slice(max(0, int(np.floor(lo[a] / grid.spacing[a]))),
                     min(grid.shape[a], int(np.ceil(hi[a] / grid.spacing[a])) + 1)) for a in range(3))
    if any(s.stop <= s.start for s in sl):
        return np.zeros((0, 0, 0), np.float32), sl
    axes = [(np.arange(s.start, s.stop) + 0.5) * grid.spacing[a] for a, s in enumerate(sl)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    lev = blob.level(pts).reshape(tuple(s.stop - s.start for s in sl))
    return _soft((1.0 - lev) * mean_radius, grid.voxel), sl


@dataclass
class _Grid:
    shape: tuple[int, int, int]  # canonical (x LR, y AP, z SI)
    spacing: tuple[float, float, float]
    voxel: float = field(init=False)

    def __post_init__(self) -> None:
        self.voxel = float(np.mean(self.spacing))

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(((np.arange(n, dtype=np.float32) + 0.5) * s).reshape(
            [-1 if a == i else 1 for a in range(3)]) for i, (n, s) in enumerate(zip(self.shape, self.spacing,
                                                                                     strict=True)))

    @property
    def extent(self) -> np.ndarray:
        return np.array(self.shape) * np.array(self.spacing)


# --------------------------------------------------------------------------------------------------
# Disparity mechanisms: what makes the hard subgroup hard (module docstring, "Disparity mechanisms")
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mechanism:
    """The ``default`` mechanism, and the hooks through which the others change a cohort.

    ``plan_factors`` sets per-case factors from a random stream of the mechanism's own (``stream``), drawn for
    every case, so every mechanism has the same patients; ``foci_curve`` may replace the BPE foci's kinetics;
    ``draw_lesions`` places extra lesions with a per-case stream of their own (the render stream is untouched,
    so a case without lesions is the same case in every mechanism).
    """

    name: str = "default"
    stream: int = 0

    @property
    def has_lesions(self) -> bool:
        return False

    def apply(self, plan: pd.DataFrame, seed: int, counterfactual: bool = False) -> pd.DataFrame:
        """``plan`` with the mechanism's columns set (``disparity``, ``hidden_fraction`` and its own)."""
        plan["disparity"] = self.name
        plan["hidden_fraction"] = 0.0
        if self.stream == 0:  # default: no draw at all, the original plan
            return plan
        rng = np.random.default_rng(np.random.SeedSequence([seed, 3, self.stream]))
        self.plan_factors(plan, plan["hard_subgroup"].to_numpy(bool), rng, counterfactual)
        return plan

    def plan_factors(self, plan: pd.DataFrame, hard: np.ndarray, rng: np.random.Generator,
                     counterfactual: bool) -> None:
        """Set the mechanism's per-case columns in place (nothing for ``default``)."""

    def foci_curve(self, case: dict[str, Any], foci_amp: float) -> Callable[[float], float] | None:
        """Relative-enhancement curve of the BPE foci, or None for the default one."""
        return None


@dataclass(frozen=True)
class Representation(Mechanism):
    """Tumour-sized look-alike foci only in the hard subgroup (2 + Poisson(2)), cued by a steady linear rise."""

    def plan_factors(self, plan: pd.DataFrame, hard: np.ndarray, rng: np.random.Generator,
                     counterfactual: bool) -> None:
        # Look-alikes only where the subgroup is: a few tumour-sized ones per case, so that each costs a
        # hard case's Dice a lot while the whole cohort holds few of them to learn from.
        plan["n_foci"] = np.where(hard, 2 + rng.poisson(2.0, len(plan)), 0).astype(int)

    def foci_curve(self, case: dict[str, Any], foci_amp: float) -> Callable[[float], float] | None:
        # As bright as a tumour at the second post-contrast phase, reached by a steady linear rise, so at
        # the first post-contrast phase they are only t1/t2 of that: phase 2 is 1.5-3x phase 1 (median ~2x),
        # a cue the model sees (tumours have nearly peaked by then: <= 1.35x). Not a vessel-bright outlier,
        # which a model trained on the majority already rejects. Capped at 2x the phase-2 value.
        t2 = float(case["acquisition_times"][2])
        return lambda t: 0.55 * foci_amp * min(t / t2, 2.0)


@dataclass(frozen=True)
class Intrinsic(Mechanism):
    """No foci; 35-55 % of each hard-subgroup tumour enhances like parenchyma (negative control)."""

    def plan_factors(self, plan: pd.DataFrame, hard: np.ndarray, rng: np.random.Generator,
                     counterfactual: bool) -> None:
        plan["n_foci"] = 0
        plan["hidden_fraction"] = np.where(hard, np.round(rng.uniform(0.35, 0.55, len(plan)), 4), 0.0)


@dataclass(frozen=True)
class LookAlike(Mechanism):
    """Positive control: look-alike lesions in the hard subgroup that only phase 2 tells from a tumour.

    The hard subgroup's BPE is brought down to the level of other dense premenopausal women (``bpe_young``
    replaces the <= 40 factor 1.0 in the BPE model), so its diffuse parenchyma no longer hides tumours; instead
    each hard case holds ``base_lesions`` + Poisson(``extra_lesions``) lesions of radius ``radius_mm``, centred
    in parenchyma and not touching the tumour, that match the tumour (pre-contrast signal and enhancement) at
    phases 0-1 and then lose ``drop`` of their enhancement by phase 2, where tumours lose <= 30 %. Lesion
    positions, sizes and drops come from a per-case stream of their own, shared by every look-alike variant, so
    the weak variant (a smaller drop: the dose control) and the counterfactual rendering (no lesions drawn)
    have the same patients and the same lesion sites.
    """

    drop: tuple[float, float] = (0.50, 0.70)
    base_lesions: int = 4
    extra_lesions: float = 3.0
    radius_mm: tuple[float, float] = (4.0, 9.0)
    bpe_young: float = 0.5

    @property
    def has_lesions(self) -> bool:
        return True

    def plan_factors(self, plan: pd.DataFrame, hard: np.ndarray, rng: np.random.Generator,
                     counterfactual: bool) -> None:
        n = len(plan)
        density = plan["density_true"].map(_BPE_DENSITY).to_numpy(float)
        bpe = np.clip(0.08 + 0.9 * self.bpe_young * density + rng.normal(0, 0.07, n), 0.0, 1.0)
        foci = rng.poisson(7.0 * np.maximum(0.0, bpe - 0.35))  # the default model's foci for that BPE
        lesions = self.base_lesions + rng.poisson(self.extra_lesions, n)
        plan["bpe_strength"] = np.where(hard, bpe, plan["bpe_strength"].to_numpy(float))
        plan["n_foci"] = np.where(hard, foci, plan["n_foci"].to_numpy(int)).astype(int)
        plan["n_lesions"] = np.where(hard, lesions, 0).astype(int)
        plan["counterfactual"] = bool(counterfactual)

    def draw_lesions(self, case: dict[str, Any], grid: _Grid, fgt: np.ndarray, tum: np.ndarray,
                     foci: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """Lesion fraction map, per-voxel phase-2 drop, integer label map and radii (mm) of one case."""
        frac = np.zeros(grid.shape, np.float32)
        drop = np.zeros(grid.shape, np.float32)
        labels = np.zeros(grid.shape, np.uint8)
        radii: list[float] = []
        n = int(case.get("n_lesions") or 0)
        # centres in parenchyma, clear of the tumour (two voxels) and of the BPE foci
        clear = ~ndi.binary_dilation(tum > 0, iterations=2)
        pts = np.argwhere((fgt > 0.6) & clear & (foci < 0.1))
        for _ in range(n * 10):
            if len(radii) >= n or len(pts) == 0:
                break
            c = (pts[int(rng.integers(len(pts)))] + 0.5) * np.array(grid.spacing)
            r = float(rng.uniform(*self.radius_mm))
            u = float(rng.random())  # the same u in every variant: only the drop's range differs
            fb, sl = _blob_fraction(_make_blob(rng, c, r, 2, 0.1), grid, r)
            if not fb.size or (fb.max() < 0.5):
                continue
            # never overlapping the tumour, another lesion or a focus (each lesion is its own region)
            if ((fb > 0) & ((tum[sl] > 0) | (frac[sl] > 0) | (foci[sl] > 0))).any():
                continue
            radii.append(round(r, 2))
            frac[sl] = np.maximum(frac[sl], fb)
            drop[sl] = np.where(fb > 0, self.drop[0] + u * (self.drop[1] - self.drop[0]), drop[sl])
            labels[sl] = np.where(fb > 0.5, len(radii), labels[sl])
        return {"fraction": frac, "drop": drop, "labels": labels, "radii": radii}


MECHANISMS: dict[str, Mechanism] = {
    "default": Mechanism(),
    "representation": Representation("representation", 1),
    "intrinsic": Intrinsic("intrinsic", 2),
    "lookalike": LookAlike("lookalike", 3),
    "lookalike_weak": LookAlike("lookalike_weak", 3, drop=(0.30, 0.45)),
}


def mechanism_of(disparity: str) -> Mechanism:
    """The :class:`Mechanism` named ``disparity`` (one of :data:`DISPARITIES`)."""
    if disparity not in MECHANISMS:
        raise ValueError(f"unknown disparity {disparity!r}; choose one of {', '.join(DISPARITIES)}")
    return MECHANISMS[disparity]


def lesion_kinetics(tumour: Callable[[float], float], t1: float,
                    t2: float) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """The two curves of look-alike lesions: ``(rise, loss)`` with RE(t) = rise(t) - drop * loss(t).

    ``rise`` follows the tumour up to the first post-contrast phase and then holds; ``loss`` grows linearly to
    the tumour's phase-1 enhancement at phase 2, so at phase 2 a lesion keeps ``1 - drop`` of it. Split in two
    so that each lesion's own drop is a per-voxel map (linear in the drop).
    """
    e1 = tumour(t1)
    return (lambda t: tumour(min(t, t1))), (lambda t: e1 * min(1.0, max(0.0, (t - t1) / (t2 - t1))))


def _kinetics(case: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Relative-enhancement curves RE(t) of each enhancing component."""
    amp = float(rng.uniform(0.9, 1.5))
    tau = float(rng.uniform(35, 70))
    wash = float(rng.uniform(0.12, 0.3)) if case["kinetics"] == "washout" else float(rng.uniform(-0.02, 0.05))
    t_peak = 2.5 * tau
    bpe = case["bpe_strength"]
    tau_slow = float(rng.uniform(250, 450))
    # Foci rise quickly and then keep creeping up: over the first minutes they look like a tumour with a
    # plateau; they never wash out.
    foci_amp = float(rng.uniform(1.3, 1.9)) * (0.6 + 0.4 * bpe)
    tau_foci = float(rng.uniform(40, 100))

    def tumour(t: float) -> float:  # fast uptake, then washout or plateau
        return amp * (1 - math.exp(-t / tau)) * (1 - wash * max(0.0, t - t_peak) / 300.0)

    def default_foci(t: float) -> float:
        return foci_amp * t / (t + tau_foci)  # faster than BPE, still persistent (never washes out)

    foci = mechanism_of(case.get("disparity") or "default").foci_curve(case, foci_amp) or default_foci
    curves = {
        "tumour": tumour,
        "bpe": lambda t: 2.2 * bpe * t / (t + tau_slow),  # slow persistent rise
        "foci": foci,
        "vessel": lambda t: 2.5 * (1 - math.exp(-t / 25.0)),
        "background": lambda t: 0.25 * t / (t + 150.0),  # muscle, skin
    }
    times = case["acquisition_times"]
    if len(times) > 2:  # look-alike lesions and rim-enhancing cores (only used where a case has them)
        curves["lesion"], curves["lesion_loss"] = lesion_kinetics(tumour, float(times[1]), float(times[2]))
    # a rim-enhancing tumour's core: slow, weak, persistent (delayed central enhancement)
    curves["core"] = lambda t: 0.35 * amp * t / (t + 300.0)
    return curves


# The scene is built in named pieces, in the order of their draws from the case's render stream (the order is
# what keeps a cohort byte-identical): breast shape -> body -> parenchyma -> tumour (-> hidden cap) -> foci ->
# [mechanism lesions and tumour core, each from a stream of its own] -> vessels -> composition.


def _breast_shape(case: dict[str, Any], grid: _Grid, rng: np.random.Generator) -> dict[str, Any]:
    """The breast(s) in the field of view: lobe-shaped fat, skin and the chest wall's position."""
    X, Y, Z = grid.coords()
    L = grid.extent
    bilateral = bool(case["bilateral"])
    sagittal = case["view"] == "sagittal"
    crop = case["preset"] == "default"
    size = (case["bmi"] / 28.0) ** 0.5 * rng.uniform(0.88, 1.12)
    if bilateral:
        y_cw0 = 0.5 * L[1]
    elif sagittal:
        y_cw0 = 0.3 * L[1]
    else:
        y_cw0 = 0.2 * L[1]
    curve = 10.0 if not bilateral else 25.0
    y_cw = y_cw0 - curve * ((X - L[0] / 2) / (L[0] / 2)) ** 2  # chest wall bulges forward in the middle
    depth = L[1] - y_cw0

    breasts = []  # (x centre, radius LR, depth AP, radius SI) in mm
    if crop:  # the default preset's field of view is cut around one breast
        breasts.append((L[0] / 2 + rng.normal(0, 0.03) * L[0], min(0.40 * L[0] * size, 0.47 * L[0]),
                        min(0.72 * depth * size, 0.9 * depth), min(0.40 * L[2] * size, 0.46 * L[2])))
    else:  # real fields of view: breasts of real size (~65 mm half-width, ~75 mm deep)
        cap = 0.23 * L[0] if bilateral else 0.47 * L[0]
        off = rng.uniform(0.22, 0.26) * L[0]
        for xc in ((L[0] / 2 - off, L[0] / 2 + off) if bilateral else (L[0] / 2,)):
            breasts.append((xc, min(65.0 * size, cap), min(75.0 * size, 0.9 * depth),
                            min(65.0 * size * rng.uniform(0.9, 1.1), 0.46 * L[2])))
    zc = L[2] / 2 + rng.normal(0, 0.04) * L[2]
    coarse = np.maximum(np.array(grid.shape) / 4.0, 1.0)
    wobble = _smooth_noise(rng, grid.shape, coarse)
    breast_d = np.full(grid.shape, -1e3, np.float32)
    q_breast = []
    for xc, rx, ry, rz in breasts:
        q = np.sqrt(((X - xc) / rx) ** 2 + ((Y - y_cw) / ry) ** 2 + ((Z - zc) / rz) ** 2) * (1 + 0.06 * wobble)
        q = np.where(Y >= y_cw, q, 10.0).astype(np.float32)
        q_breast.append(q)
        breast_d = np.maximum(breast_d, (1.0 - q) * min(rx, ry, rz))
    breast = _soft(breast_d, grid.voxel)
    skin = np.clip(_soft(breast_d, grid.voxel) - _soft(breast_d - 2.0, grid.voxel), 0, 1)
    return {"breasts": breasts, "q_breast": q_breast, "breast": breast, "skin": skin, "y_cw": y_cw,
            "y_cw0": y_cw0, "zc": zc, "bilateral": bilateral}


def _body(shape_: dict[str, Any], grid: _Grid, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Body behind the chest wall: pectoral muscle band, then thorax (dark lung, brighter mediastinum)."""
    X, Y, _ = grid.coords()
    L = grid.extent
    behind = shape_["y_cw"] - Y
    muscle_mm = rng.uniform(8, 14)
    body = _soft(behind, grid.voxel)
    if shape_["bilateral"]:  # the torso ends laterally
        body = body * _soft(0.48 * L[0] - np.abs(X - L[0] / 2) + 0 * Y, grid.voxel)
    muscle = body * _soft(muscle_mm - behind, grid.voxel)
    return {"muscle": muscle, "thorax": np.clip(body - muscle, 0, 1)}


def _parenchyma(case: dict[str, Any], shape_: dict[str, Any], grid: _Grid,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fibroglandular tissue (textured field + central prior, thresholded to the density's volume fraction) and
    the tissue texture."""
    _, Y, _ = grid.coords()
    sp = np.array(grid.spacing)
    fine = 6.0 / sp  # ~6 mm correlation length of tissue texture
    lo, hi = _FGT_FRACTION[case["density_true"]]
    target = float(rng.uniform(lo, hi))
    texture = _smooth_noise(rng, grid.shape, fine)
    # FGT strands run from the nipple towards the chest wall: texture elongated along AP, two scales.
    strands = (0.6 * _smooth_noise(rng, grid.shape, np.array([2.5, 6.0, 2.5]) / sp)
               + 0.4 * _smooth_noise(rng, grid.shape, np.array([6.0, 12.0, 6.0]) / sp))
    fgt = np.zeros(grid.shape, np.float32)
    for q in shape_["q_breast"]:
        inside = q < 1.0
        eligible = (q < 0.88) & (Y - shape_["y_cw"] > 5.0)
        if eligible.sum() < 10:
            continue
        score = strands + 2.0 * (1.0 - q)
        thr = np.quantile(score[eligible], max(0.0, 1.0 - target * inside.sum() / eligible.sum()))
        fgt = np.maximum(fgt, np.where(eligible, np.clip((score - thr) / 0.35 + 0.5, 0, 1), 0.0))
    return (fgt * shape_["breast"]).astype(np.float32), texture


def _tumour(case: dict[str, Any], shape_: dict[str, Any], fgt: np.ndarray, grid: _Grid,
            rng: np.random.Generator) -> dict[str, Any]:
    """The tumour: inside one breast, preferably in FGT, away from skin and chest wall; rescaled to its volume."""
    breasts, breast = shape_["breasts"], shape_["breast"]
    r_t = (3.0 * case["tumour_ml_target"] * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    b_idx = int(rng.integers(len(breasts)))
    qb = shape_["q_breast"][b_idx]
    margin = min(0.8, max(0.3, 1.0 - 1.2 * r_t / min(breasts[b_idx][1:])))
    cand = np.argwhere((qb < margin) & (fgt > 0.3))
    if len(cand) < 5:
        cand = np.argwhere(qb < margin)
    if len(cand) == 0:
        cand = np.argwhere(qb < 1.0)
    if len(cand) == 0:
        cand = np.argwhere(np.ones(grid.shape, bool))
    centre = (cand[int(rng.integers(len(cand)))] + 0.5) * np.array(grid.spacing)
    tumour = _make_blob(rng, centre, r_t, int(rng.integers(2, 5)), 0.12)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    frac, sl = _blob_fraction(tumour, grid, r_t)
    for _ in range(3):  # rescale towards the target volume (lobes overlap, the breast clips)
        vol = float((frac * breast[sl]).sum()) * voxel_ml if frac.size else 0.0
        if vol <= 0 or abs(vol / case["tumour_ml_target"] - 1) < 0.08:
            break
        s = float(np.clip((case["tumour_ml_target"] / vol) ** (1 / 3), 0.6, 1.6))
        tumour, r_t = tumour.scaled(s), r_t * s
        frac, sl = _blob_fraction(tumour, grid, r_t)
    tum = np.zeros(grid.shape, np.float32)
    if frac.size:
        tum[sl] = frac
    tum *= breast
    return {"fraction": tum, "centre": tumour.centres[0], "radius": r_t, "breast_index": b_idx}


def _foci(case: dict[str, Any], fgt: np.ndarray, tumour: dict[str, Any], breast: np.ndarray, grid: _Grid,
          rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """BPE foci: small lobulated blobs in FGT, away from the tumour (fraction map, number placed)."""
    tum = tumour["fraction"]
    foci = np.zeros(grid.shape, np.float32)
    fgt_pts = np.argwhere(fgt > 0.6)
    placed = 0
    for _ in range(case["n_foci"] * 4):
        if placed >= case["n_foci"] or len(fgt_pts) == 0:
            break
        c = (fgt_pts[int(rng.integers(len(fgt_pts)))] + 0.5) * np.array(grid.spacing)
        if np.linalg.norm(c - tumour["centre"]) < tumour["radius"] + 10.0:
            continue
        r = float(rng.uniform(4.0, 9.0))  # 0.3-3 ml: the size of small tumours
        fb, fsl = _blob_fraction(_make_blob(rng, c, r, 2, 0.1), grid, r)
        if fb.size:
            foci[fsl] = np.maximum(foci[fsl], fb)
        placed += 1
    return np.minimum(foci * breast, np.clip(breast - tum, 0, 1)), placed


def _vessels(shape_: dict[str, Any], grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """A few vessels running from the chest wall towards the nipple (fast, strong enhancement everywhere)."""
    X, Y, Z = grid.coords()
    vessel = np.zeros(grid.shape, np.float32)
    y_cw0, zc = shape_["y_cw0"], shape_["zc"]
    for xc, rx, ry, rz in shape_["breasts"]:
        for _ in range(int(rng.integers(1, 4))):
            p0 = np.array([xc + rng.uniform(-0.6, 0.6) * rx, y_cw0 + 3.0, zc + rng.uniform(-0.6, 0.6) * rz])
            p1 = np.array([xc + rng.uniform(-0.3, 0.3) * rx, y_cw0 + 0.8 * ry, zc + rng.uniform(-0.3, 0.3) * rz])
            d = p1 - p0
            t = np.clip(((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / (d @ d), 0, 1)
            dist = np.sqrt((X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2)
            vessel = np.maximum(vessel, _soft(rng.uniform(1.2, 2.0) - dist, grid.voxel))
    return vessel * shape_["breast"]


def _scene(case: dict[str, Any], grid: _Grid, rng: np.random.Generator,
           lesion_rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Tissue fraction maps and intensity components on ``grid`` (canonical orientation).

    ``lesion_rng`` is the case's own stream for a look-alike mechanism's lesions (drawn, or in a counterfactual
    cohort only placed for the truth label map); without it a case with lesions gets none.
    """
    X, Y, Z = grid.coords()
    L = grid.extent
    shape = grid.shape
    sp = np.array(grid.spacing)
    fine = 6.0 / sp
    coarse = np.maximum(np.array(shape) / 4.0, 1.0)

    shape_ = _breast_shape(case, grid, rng)
    breast, skin = shape_["breast"], shape_["skin"]
    body = _body(shape_, grid, rng)
    fgt, texture = _parenchyma(case, shape_, grid, rng)
    tumour = _tumour(case, shape_, fgt, grid, rng)
    tum = tumour["fraction"]
    hidden = _hidden_part(case, tum, tumour["centre"], (X, Y, Z), grid, rng)
    foci, placed = _foci(case, fgt, tumour, breast, grid, rng)

    mechanism = mechanism_of(case.get("disparity") or "default")
    lesions: dict[str, Any] | None = None
    if isinstance(mechanism, LookAlike) and int(case.get("n_lesions") or 0) > 0 and lesion_rng is not None:
        lesions = mechanism.draw_lesions(case, grid, fgt, tum, foci, lesion_rng)
    drawn = lesions is not None and not bool(case.get("counterfactual"))
    les = np.minimum(lesions["fraction"] * breast, np.clip(breast - tum - foci, 0, 1)) if drawn else None
    core = _core_part(case, tum - hidden, grid)

    vessel = _vessels(shape_, grid, rng)

    if les is None:
        fgt = np.clip(fgt - tum - foci, 0, 1)
        vessel = np.minimum(vessel, np.clip(breast - tum - fgt - foci, 0, 1))
        fat = np.clip(breast - tum - fgt - foci - vessel - skin, 0, 1)
    else:  # lesions take the place of parenchyma (and of fat at their edges)
        fgt = np.clip(fgt - tum - foci - les, 0, 1)
        vessel = np.minimum(vessel, np.clip(breast - tum - fgt - foci - les, 0, 1))
        fat = np.clip(breast - tum - fgt - foci - les - vessel - skin, 0, 1)

    fs = bool(case["fat_suppressed"])
    s0 = {"fat": 0.30 if fs else 0.95, "fgt": 0.62 if fs else 0.50, "tumour": 0.50, "vessel": 0.40,
          "skin": 0.55, "muscle": 0.45, "thorax": 0.22}
    muscle, thorax = body["muscle"], body["thorax"]
    tex = 1.0 + 0.06 * texture
    thorax_tex = np.clip(1.0 + 0.5 * _smooth_noise(rng, shape, fine * 2), 0.2, 2.0)
    # The hidden part of a tumour (intrinsic mechanism; zero otherwise) looks and enhances like parenchyma.
    seen = tum - hidden
    pre = (fat * s0["fat"] * tex + (fgt + foci + hidden) * s0["fgt"] * tex + seen * s0["tumour"]
           + vessel * s0["vessel"] + skin * s0["skin"] + muscle * s0["muscle"] + thorax * s0["thorax"] * thorax_tex)
    components = {
        "tumour": seen * s0["tumour"],
        "bpe": (fgt + hidden) * s0["fgt"],
        "foci": foci * s0["fgt"],
        "vessel": vessel * s0["vessel"],
        "background": (muscle * s0["muscle"] + skin * s0["skin"] + thorax * s0["thorax"] * 0.3),
    }
    if core is not None:  # a necrotic core (darker, no enhancement) or a rim-enhancing tumour's slow core
        necrotic = case["tumour_appearance"] == "necrotic"
        components["tumour"] = (seen - core) * s0["tumour"]
        pre = pre - core * s0["tumour"] + core * (0.35 if necrotic else s0["tumour"])
        if not necrotic:
            components["core"] = core * s0["tumour"]
    if les is not None:  # look-alike lesions: the tumour's pre-contrast signal and (up to phase 1) enhancement
        pre = pre + les * s0["tumour"]
        components["lesion"] = les * s0["tumour"]
        components["lesion_loss"] = -(les * lesions["drop"]) * s0["tumour"]
    # Smooth multiplicative bias (coil sensitivity): random low-frequency field plus an AP gradient.
    g = rng.standard_normal(3)
    ramp = (g[0] * X / L[0] + g[1] * Y / L[1] + g[2] * Z / L[2]).astype(np.float32)
    bias_field = np.exp(case["bias_amplitude"] * (0.7 * _smooth_noise(rng, shape, coarse * 1.5)
                                                  + 0.5 * (ramp - ramp.mean()))).astype(np.float32)
    inside = breast > 0.5
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    return {
        "pre": pre.astype(np.float32),
        "components": components,
        "bias": bias_field,
        "tumour_fraction": tum,
        "foci_fraction": foci,
        "breast": breast,
        "fgt_fraction_measured": float((fgt + foci)[inside].sum() / max(1.0, float(inside.sum()))),
        "breast_ml": float(breast.sum()) * voxel_ml,
        "n_foci_placed": placed,
        "breast_index": tumour["breast_index"],
        "breasts": shape_["breasts"],
        "y_cw0": shape_["y_cw0"],
        "zc": shape_["zc"],
        "lesions": lesions,
        "core_fraction_map": core,
    }


def _core_part(case: dict[str, Any], tum: np.ndarray, grid: _Grid) -> np.ndarray | None:
    """Fraction map of a necrotic or rim-enhancing tumour's core (``core_fraction`` of its voxels, the deepest),
    or None (the default appearance). Deterministic: no random draw."""
    share = float(case.get("core_fraction") or 0.0)
    inside = tum > 0.5
    if share <= 0 or case.get("tumour_appearance", "default") == "default" or inside.sum() < 8:
        return None
    depth = ndi.distance_transform_edt(inside, sampling=grid.spacing).astype(np.float32)
    cut = float(np.quantile(depth[inside], 1.0 - share))
    return (tum * _soft(depth - cut, grid.voxel)).astype(np.float32)


def _hidden_part(case: dict[str, Any], tum: np.ndarray, centre: np.ndarray,
                 coords: tuple[np.ndarray, np.ndarray, np.ndarray], grid: _Grid,
                 rng: np.random.Generator) -> np.ndarray:
    """Fraction map of the tumour cap that does not enhance as tumour (``hidden_fraction`` of its voxels).

    The cap lies beyond a plane of random orientation; its position is chosen so that the requested share
    of the tumour's voxels is hidden, with a one-voxel soft edge. Zero (and no random draw) unless the case
    has a ``hidden_fraction`` > 0, so the other mechanisms' random streams are untouched.
    """
    share = float(case.get("hidden_fraction") or 0.0)
    inside = tum > 0.5
    if share <= 0 or not inside.any():
        return np.zeros_like(tum)
    u = rng.standard_normal(3)
    u /= np.linalg.norm(u)
    X, Y, Z = coords
    proj = ((X - centre[0]) * u[0] + (Y - centre[1]) * u[1] + (Z - centre[2]) * u[2]).astype(np.float32)
    proj = np.broadcast_to(proj, tum.shape)
    cut = float(np.quantile(proj[inside], 1.0 - share))
    return (tum * _soft(proj - cut, grid.voxel)).astype(np.float32)


def _blur(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Partial volume across slices (a 1-D blur along the slice axis)."""
    return ndi.gaussian_filter1d(a, sigma, axis=axis, mode="nearest", truncate=3.0) if sigma > 0 else a


def _upsample(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if a.shape == tuple(shape):
        return a
    import torch  # trilinear upsampling of whole volumes: torch is much faster than scipy here

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=tuple(shape), mode="trilinear",
                                           align_corners=False)[0, 0].numpy()


def _render(case: dict[str, Any], rng: np.random.Generator,
            write_phase: Callable[[int, np.ndarray], None],
            lesion_rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Render one case: each int16 phase goes to ``write_phase(k, array)`` as soon as it exists (so a big
    realistic case never holds all its phases in memory); returns the mask, automatic mask, breast box and
    measured truth, all in the written orientation."""
    full_shape = case["shape"]
    spacing = case["spacing"]
    sagittal = case["view"] == "sagittal"
    if sagittal:  # canonical (LR, AP, SI) from written (AP, SI, LR)
        full_canon = (full_shape[2], full_shape[0], full_shape[1])
        sp_canon = (spacing[2], spacing[0], spacing[1])
    else:
        full_canon = tuple(full_shape)
        sp_canon = tuple(spacing)

    def written(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.transpose(1, 2, 0)) if sagittal else a

    # Work on a coarse grid (<= ~128 in-plane, <= 64 across) and upsample, to keep big cases fast.
    factors = [max(1, math.ceil(n / 128)) for n in full_canon]
    if not sagittal:
        factors[2] = max(1, math.ceil(full_canon[2] / 64))
    work_shape = tuple(max(8, round(n / f)) for n, f in zip(full_canon, factors, strict=True))
    work_sp = tuple(s * n / w for s, n, w in zip(sp_canon, full_canon, work_shape, strict=True))
    grid = _Grid(work_shape, work_sp)
    sc = _scene(case, grid, rng, lesion_rng)
    mask = (_upsample(sc["tumour_fraction"], full_canon) > 0.5).astype(np.uint8)

    curves = _kinetics(case, rng)
    scale = np.float32(case["intensity_scale"])
    top = 2 ** (case["high_bit"] + 1) - 1
    # Partial volume: thicker slices blur across slices (sagittal slices run left-right).
    axis = 0 if sagittal else 2
    zb = case["z_blur"] * work_shape[axis] / full_canon[axis]
    noise = rng.standard_normal(int(np.prod(full_canon)), dtype=np.float32)
    noise *= np.float32(case["noise_rel"]) * scale
    for k, t in enumerate(case["acquisition_times"]):
        work = sc["pre"].copy()
        for name, comp in sc["components"].items():
            re = curves[name](float(t))
            if re:
                work += np.float32(re) * comp
        img = _upsample(_blur(work * sc["bias"], zb, axis), full_canon) * scale
        flat = img.reshape(-1)
        # One noise draw per case, circularly shifted per phase: independent-looking noise, one RNG call.
        shift = int(rng.integers(1, noise.size)) if k else 0
        flat[: flat.size - shift] += noise[shift:]
        flat[flat.size - shift:] += noise[:shift]
        np.abs(flat, out=flat)
        np.rint(flat, out=flat)
        np.clip(flat, 0, top, out=flat)
        write_phase(k, written(img.astype(np.int16)))
        del img, flat
    del noise

    auto = _automatic(mask, _upsample(sc["foci_fraction"], full_canon) > 0.5, case["bpe_strength"], rng)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_tumour = int(mask.sum())
    measured = {
        "fgt_fraction": sc["fgt_fraction_measured"],
        "breast_ml": sc["breast_ml"],
        "tumour_voxels": n_tumour,
        "tumour_ml": n_tumour * voxel_ml,
        "tumour_fraction_of_volume": n_tumour / mask.size,
        "n_foci": sc["n_foci_placed"],
    }
    box = _breast_box(sc, grid, full_canon, mask)
    if sagittal:  # canonical (LR, AP, SI) -> written (AP, SI, LR)
        box = (box[1], box[2], box[0])
    out = {"mask": written(mask), "auto": written(auto), "measured": measured, "box": box}
    if sc["lesions"] is not None:
        out["lesion_labels"] = written(_nearest(sc["lesions"]["labels"], full_canon))
        out["lesion_radii"] = sc["lesions"]["radii"]
    return out


def _nearest(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of a label map from the work grid to the full grid."""
    if a.shape == tuple(shape):
        return a
    idx = [np.minimum((np.arange(n) + 0.5) * a.shape[i] / n, a.shape[i] - 1).astype(int)
           for i, n in enumerate(shape)]
    return a[np.ix_(*idx)]


def _breast_box(sc: dict[str, Any], grid: _Grid, full_canon: tuple[int, ...],
                mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Bounding box (canonical axes, voxel [lo, hi) on the full grid) of the breast holding the tumour."""
    xc, rx, ry, rz = sc["breasts"][sc["breast_index"]]
    # the breast (its surface wobbles by up to ~6 %) plus a few mm, and ~10 mm of chest wall behind it
    lo = np.array([xc - 1.08 * rx - 3.0, sc["y_cw0"] - 10.0, sc["zc"] - 1.08 * rz - 3.0])
    hi = np.array([xc + 1.08 * rx + 3.0, sc["y_cw0"] + 1.08 * ry + 3.0, sc["zc"] + 1.08 * rz + 3.0])
    sp_full = grid.extent / np.array(full_canon)
    box = []
    idx = np.argwhere(mask)
    for a in range(3):
        b0 = int(np.clip(np.floor(lo[a] / sp_full[a]), 0, full_canon[a] - 1))
        b1 = int(np.clip(np.ceil(hi[a] / sp_full[a]), b0 + 1, full_canon[a]))
        if len(idx):  # the box always contains the whole tumour
            b0, b1 = min(b0, int(idx[:, a].min())), max(b1, int(idx[:, a].max()) + 1)
        box.append((b0, b1))
    return tuple(box)


def _automatic(mask: np.ndarray, foci: np.ndarray, bpe: float, rng: np.random.Generator) -> np.ndarray:
    """An imperfect automatic segmentation: a slightly grown or shrunk tumour, sometimes BPE foci too."""
    op = rng.integers(3)
    auto = mask.astype(bool)
    if op == 1:
        auto = ndi.binary_dilation(auto)
    elif op == 2 and auto.sum() > 50:
        auto = ndi.binary_erosion(auto)
    if foci.any() and rng.random() < 0.6 * bpe:
        auto |= foci
    return auto.astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _affine(case: dict[str, Any]) -> np.ndarray:
    sx, sy, sz = case["spacing"]
    aff = np.eye(4)
    if case["view"] == "sagittal":  # written axes (AP, SI, LR)
        aff[:3, :3] = [[0, 0, -sz], [sx, 0, 0], [0, sy, 0]]
    else:  # written axes (LR, AP, SI); x flipped as in DICOM-derived (LPS) volumes
        aff[:3, :3] = np.diag([-sx, sy, sz])
    nx, ny, nz = case["shape"]
    aff[:3, 3] = -aff[:3, :3] @ (np.array([nx, ny, nz]) / 2.0)
    return aff


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, level: int) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # gzip with mtime 0 and no file name so that the bytes depend on the data only (determinism).
    return gzip.compress(img.to_bytes(), compresslevel=level, mtime=0)


def _json_value(v: Any) -> Any:
    """Plain Python value for JSON/openpyxl: numpy scalars unwrapped, NaN -> None, recursively."""
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        v = float(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _info(case: dict[str, Any], box: tuple[tuple[int, int], ...]) -> dict[str, Any]:
    (i0, i1), (j0, j1), (k0, k1) = box
    age = _json_value(case["age_reported"])
    pcr = _json_value(case["pcr"])
    return _json_value({
        "patient_id": case["patient_id"],
        "clinical_data": {
            "age": None if age is None else int(age),
            "menopausal_status": case["menopause_reported"],
            "breast_density": case["density_reported"],
            "ethnicity": case["ethnicity"],
            "weight": _json_value(case["weight"]),
            "patient_size": _json_value(case["patient_size"]),
            "bmi_group": case["bmi_group"],
        },
        "primary_lesion": {
            "pcr": None if pcr is None else int(pcr),
            "tumor_subtype": case["tumor_subtype"],
            "hr": case["hr"], "er": case["er"], "pr": case["pr"], "her2": case["her2"],
            # organisers' convention: x = NIfTI axis k (SimpleITK array axis 0), z = NIfTI axis i
            "breast_coordinates": {"x_min": k0, "x_max": k1, "y_min": j0, "y_max": j1, "z_min": i0, "z_max": i1},
        },
        "imaging_data": {
            "dataset": case["dataset"],
            "site": case["site"],
            "bilateral": bool(case["bilateral"]),
            "view": case["view"],
            "scanner_manufacturer": case["manufacturer"],
            "scanner_model": case["scanner_model"],
            "field_strength": case["field_strength"],
            "num_phases": case["num_phases"],
            "fat_suppressed": bool(case["fat_suppressed"]),
            "image_rows": case["image_rows"],
            "image_columns": case["image_columns"],
            "num_slices": case["num_slices"],
            "pixel_spacing": [case["spacing"][0], case["spacing"][1]],
            "slice_thickness": case["spacing"][2],
            "echo_time": case["echo_time"],
            "repetition_time": case["repetition_time"],
            "acquisition_times": list(case["acquisition_times"]),
        },
    })


def _spreadsheet_rows(plan: pd.DataFrame, windows: dict[str, tuple[float, float]],
                      rng: np.random.Generator) -> list[list[Any]]:
    rows = []
    for pid, c in plan.iterrows():
        nac = c["dataset"] != "DUKE"
        fu = int(rng.integers(200, 3500))
        values = {
            "patient_id": pid,
            "dataset": c["dataset"],
            "bilateral_breast_cancer": int(rng.random() < 0.04),
            "multifocal_cancer": None if rng.random() < 0.05 else float(rng.random() < 0.3),
            "nac_agent": c["nac_agent"],
            "endocrine_therapy": None if nac and rng.random() < 0.3 else float(c["hr"] and rng.random() < 0.7),
            "anti_her2_neu_therapy": None if rng.random() < 0.05 else float(bool(c["her2"])),
            "pcr": _json_value(c["pcr"]),
            "mastectomy_post_nac": None if rng.random() < 0.1 else float(rng.random() < 0.5),
            "days_to_follow_up": float(fu),
            "days_to_recurrence": float(int(rng.integers(100, fu))) if rng.random() < 0.15 else 0.0,
            "days_to_metastasis": None if rng.random() < 0.9 else float(int(rng.integers(100, fu))),
            "days_to_death": float(int(rng.integers(100, fu))) if rng.random() < 0.08 else 0.0,
            "hr": float(c["hr"]), "er": float(c["er"]), "pr": float(c["pr"]), "her2": float(c["her2"]),
            "mammaprint": None if rng.random() < 0.8 else float(rng.random() < 0.5),
            "oncotype_score": None if rng.random() < 0.85 else float(int(rng.integers(5, 45))),
            "nottingham_grade": [None, "low", "intermediate", "high"][int(rng.choice(4, p=[.3, .1, .3, .3]))],
            "tumor_subtype": c["tumor_subtype"],
            "age": c["age_reported"],
            "menopause": c["menopause_reported"],
            "breast_density": c["density_reported"],
            "ethnicity": c["ethnicity"],
            "has_implant": int(rng.random() < 0.02),
            "weight": c["weight"],
            "patient_size": c["patient_size"],
            "bmi_group": c["bmi_group"],
            "view": c["view"],
            "bilateral_mri": int(bool(c["bilateral"])),
            "num_phases": int(c["num_phases"]),
            "fat_suppressed": int(c["fat_suppressed"]),
            "field_strength": float(c["field_strength"]),
            "image_rows": int(c["image_rows"]),
            "image_columns": int(c["image_columns"]),
            "num_slices": int(c["num_slices"]),
            "pixel_spacing": f"[{c['spacing'][0]}, {c['spacing'][1]}]",
            "slice_thickness": float(c["spacing"][2]),
            "site": c["site"],
            "manufacturer": c["manufacturer"],
            "scanner_model": c["scanner_model"],
            "high_bit": int(c["high_bit"]),
            "window_center": windows[pid][0],
            "window_width": windows[pid][1],
            "echo_time": c["echo_time"],
            "repetition_time": c["repetition_time"],
            "acquisition_times": "[" + ", ".join(str(int(t)) for t in c["acquisition_times"]) + "]",
            "acquisition_date": c["acquisition_date"],
            "tcia_series_uid": c["tcia_series_uid"],
        }
        rows.append([_json_value(values[k]) for k in SPREADSHEET_COLUMNS])
    return rows


def _write_xlsx(path: Path, rows: list[list[Any]]) -> None:
    from openpyxl import Workbook
    from openpyxl.writer.excel import ExcelWriter

    wb = Workbook()
    ws = wb.active
    ws.title = SHEET
    ws.append(list(SPREADSHEET_COLUMNS))
    for r in rows:
        ws.append(r)
    fixed = _dt.datetime(2025, 1, 1)
    wb.properties.created = fixed
    wb.properties.modified = fixed
    buf = io.BytesIO()
    # ExcelWriter (not wb.save) keeps our fixed "modified" stamp; the zip is then re-packed with fixed entry
    # times so that the same cohort gives the same bytes.
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        ExcelWriter(wb, archive).save()
    buf.seek(0)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            info = zipfile.ZipInfo(item.filename, date_time=(2025, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, src.read(item.filename))


def _write_split(path: Path, plan: pd.DataFrame) -> None:
    train = sorted(plan.index[plan["split"] == "train"])
    test = sorted(plan.index[plan["split"] == "test"])
    n = max(len(train), len(test))
    # The shorter column is padded with NaN (empty fields), as in the real file.
    pd.DataFrame({"train_split": train + [None] * (n - len(train)),
                  "test_split": test + [None] * (n - len(test))}).to_csv(path, index=False)


def _prepare_root(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} exists and is not a folder; choose another --out")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise ValueError(f"{root} exists and is not empty; choose an empty folder or pass overwrite=True "
                             "(divaware synth --overwrite)")
        if not (root / TRUTH_FILE).is_file():
            # Safety: only ever delete a folder this module wrote.
            raise ValueError(f"{root} is not empty and was not written by divaware synth (no {TRUTH_FILE}); "
                             "refusing to delete it even with overwrite=True; choose another folder")


def make_cohort(root: str | Path, n_cases: int | None = None, seed: int = 0, preset: str = "default",
                missingness: str = "teaching", overwrite: bool = False,
                collections: Sequence[str] | None = None, disparity: str = "default", *,
                counterfactual: bool = False, hard_fraction: float | None = None,
                tumour_appearance: str = "default") -> Path:
    """Write a synthetic MAMA-MIA cohort under ``root`` and return its path.

    ``n_cases`` defaults to 300 (``default`` preset) or 12 (``realistic``); ``collections`` restricts the
    collection mix (e.g. ``("ISPY1", "NACT")``), keeping the real proportions among those chosen; ``disparity``
    the mechanism behind the hard subgroup's disadvantage (:data:`DISPARITIES`, see the module docstring);
    ``counterfactual``, ``hard_fraction`` and ``tumour_appearance`` as in :func:`plan_cohort`. Refuses a
    non-empty ``root`` unless ``overwrite`` (and then only a folder it wrote itself). The cohort is written
    to a temporary sibling folder and moved into place at the end, so an interrupted run leaves nothing
    half-written.
    """
    root = Path(root).expanduser()
    plan = plan_cohort(n_cases, seed, preset, missingness, collections, disparity, counterfactual=counterfactual,
                       hard_fraction=hard_fraction, tumour_appearance=tumour_appearance)
    _prepare_root(root, overwrite)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        _write_all(staging, plan, seed, preset)
        if root.exists():
            if any(root.iterdir()):
                shutil.rmtree(root)
            else:
                root.rmdir()
        staging.rename(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _write_all(out: Path, plan: pd.DataFrame, seed: int, preset: str) -> None:
    level = 1  # noisy int16 barely compresses better at higher levels (2 %), but writes 8x slower
    for sub in ("images", "segmentations/expert", "segmentations/automatic", "patient_info_files"):
        (out / sub).mkdir(parents=True)
    windows: dict[str, tuple[float, float]] = {}
    truth_rows = []
    for index, (pid, case) in enumerate(plan.iterrows()):
        c = case.to_dict()
        c["patient_id"] = pid
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1, index]))
        affine = _affine(c)
        low = pid.lower()
        folder = out / "images" / pid
        folder.mkdir()
        first: list[np.ndarray] = []

        def write_phase(k: int, image: np.ndarray, folder: Path = folder, low: str = low,
                        affine: np.ndarray = affine, first: list[np.ndarray] = first) -> None:
            (folder / f"{low}_{k:04d}.nii.gz").write_bytes(_nifti_bytes(image, affine, level))
            if k == 0:
                first.append(image[image > 0])  # for the window centre/width columns

        # a look-alike mechanism's lesions come from a stream of their own (the render stream is untouched)
        lesion_rng = (np.random.default_rng(np.random.SeedSequence([int(seed), 4, index]))
                      if int(c.get("n_lesions") or 0) > 0 else None)
        r = _render(c, rng, write_phase, lesion_rng)
        if "lesion_labels" in r:
            (out / LESION_DIR).mkdir(parents=True, exist_ok=True)
            (out / LESION_DIR / f"{pid}.nii.gz").write_bytes(
                _nifti_bytes(r["lesion_labels"].astype(np.uint8), affine, 6))
        if c["stray_tsv"]:
            lines = ["phase\tfile\tacquisition_time_s"] + [
                f"{k}\t{low}_{k:04d}.nii.gz\t{t}" for k, t in enumerate(c["acquisition_times"])]
            (folder / f"{low}.tsv").write_text("\n".join(lines) + "\n")
        (out / "segmentations" / "expert" / f"{pid}.nii.gz").write_bytes(_nifti_bytes(r["mask"], affine, 6))
        (out / "segmentations" / "automatic" / f"{low}.nii.gz").write_bytes(_nifti_bytes(r["auto"], affine, 6))
        (out / "patient_info_files" / f"{low}.json").write_text(json.dumps(_info(c, r["box"]), indent=2) + "\n")
        tissue = first[0]
        hi_ = float(np.percentile(tissue, 99.5)) if tissue.size else 1.0
        windows[pid] = (float(round(hi_ / 2)), float(round(hi_)))
        m = r["measured"]
        truth_rows.append({
            "patient_id": pid, "dataset": c["dataset"], "split": c["split"], "age": c["age"],
            "age_group": c["age_group_true"], "menopause_true": c["menopause_true"],
            "density_true": c["density_true"], "bmi": round(c["bmi"], 2), "hard_subgroup": c["hard_subgroup"],
            "bpe_strength": round(c["bpe_strength"], 4), "n_foci": m["n_foci"],
            "fgt_fraction": round(m["fgt_fraction"], 4), "breast_ml": round(m["breast_ml"], 2),
            "tumour_ml": round(m["tumour_ml"], 3), "tumour_voxels": m["tumour_voxels"],
            "tumour_fraction_of_volume": round(m["tumour_fraction_of_volume"], 6),
            "kinetics": c["kinetics"], "manufacturer": c["manufacturer"],
            "field_strength": c["field_strength"], "intensity_scale": round(c["intensity_scale"], 2),
            "noise_rel": round(c["noise_rel"], 4), "bias_amplitude": round(c["bias_amplitude"], 4),
            "z_blur": c["z_blur"], "num_phases": c["num_phases"],
            "disparity": c["disparity"], "hidden_fraction": c["hidden_fraction"],
        })
        # columns of the options a cohort uses only (the default cohort's file stays the original)
        if "n_lesions" in c:
            radii = r.get("lesion_radii", [])
            truth_rows[-1].update({"n_lesions": len(radii), "lesion_radii_mm": ";".join(f"{x:g}" for x in radii),
                                   "counterfactual": bool(c["counterfactual"])})
        if "tumour_appearance" in c:
            truth_rows[-1].update({"tumour_appearance": c["tumour_appearance"], "core_fraction": c["core_fraction"]})
    meta_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    _write_xlsx(out / "clinical_and_imaging_info.xlsx", _spreadsheet_rows(plan, windows, meta_rng))
    _write_split(out / "train_test_splits.csv", plan)
    pd.DataFrame(truth_rows).to_csv(out / TRUTH_FILE, index=False)


def read_truth(root: str | Path) -> pd.DataFrame:
    """The latent factors of a synthetic cohort (``synthetic_truth.csv``), indexed by ``patient_id``."""
    path = Path(root) / TRUTH_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: {root} is not a synthetic cohort written by divaware synth")
    truth = pd.read_csv(path, dtype={"patient_id": str})
    return truth.set_index("patient_id")


def hard_subgroup(root: str | Path, patient_ids: Sequence[str] | None = None) -> pd.Series | None:
    """Which cases the generator built hard (``hard_subgroup`` of ``synthetic_truth.csv``), as a bool Series
    indexed by ``patient_id`` (in ``patient_ids`` order when given); None for a folder that is not a synthetic
    cohort (real data has no such truth). The column is named, not guessed: a truth file without it is an error.
    """
    if not (Path(root) / TRUTH_FILE).is_file():
        return None
    truth = read_truth(root)
    if "hard_subgroup" not in truth.columns:
        raise ValueError(f"{Path(root) / TRUTH_FILE} has no hard_subgroup column (it has {list(truth.columns)}); "
                         "regenerate the cohort with divaware synth")
    hard = truth["hard_subgroup"].astype(str).str.strip().str.lower().isin(("true", "1"))
    if patient_ids is None:
        return hard.rename("hard_subgroup")
    ids = [str(i) for i in patient_ids]
    missing = [i for i in ids if i not in hard.index]
    if missing:
        raise ValueError(f"case(s) {missing[:10]} are not in {Path(root) / TRUTH_FILE}")
    return hard.loc[ids].rename("hard_subgroup")
