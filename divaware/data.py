"""MONAI data pipeline shared by training, validation and inference.

One definition of the deterministic preprocessing (:func:`preprocessing`) is used by every mode, so the
intensities a network sees at test time are computed exactly as in training (the published code
normalised differently at train and test time). Steps, in order:

1. load the chosen phases as channels (``_0000`` pre-contrast, ``_0001`` first post-contrast, ...) and the
   expert mask when present (inference works without one);
2. optionally crop to the breast box of the patient-info JSON, in the file's voxel grid (see
   :func:`breast_box`), before anything moves the grid;
3. reorient to RAS, optionally resample to a target spacing (bilinear image, nearest mask);
4. optionally add the post1 - pre subtraction channel (computed on raw intensities);
5. z-score each channel over its nonzero voxels (:func:`normalise`), per case, identically in all modes.

Training appends padding/patch sampling and augmentations (:func:`train_transforms`); validation and
inference stop after preprocessing and let :func:`divaware.model.infer` pad to the network's stride.
Every sample keeps its ``patient_id`` (a string, collated into a list), so per-case weights are always looked
up by id. Caching stores the output of the deterministic part: in memory (``CacheDataset``) when the
cohort is small, on disk (``PersistentDataset``) under the run's cache folder otherwise -- never in the
input data folder. Real-size volumes with patch training go through :mod:`divaware.preprocess` instead
(``cache: preprocessed``, which ``auto`` picks when the cases do not fit in memory): one store per machine,
read a patch at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms import InvertibleTransform, MapTransform, Randomizable

if TYPE_CHECKING:  # cohort is imported lazily at run time: it is only needed for records
    from divaware.cohort import Cohort

IMAGE, LABEL, PID, BOX = "image", "label", "patient_id", "box"
CACHE_MODES = ("auto", "memory", "disk", "none", "preprocessed")


@dataclass(frozen=True)
class DataSpec:
    """Everything that decides what a sample looks like; stored in each run's config."""

    phases: tuple[int, ...] = (0, 1, 2)
    """Phase indices loaded as channels (0 = ``_0000`` pre-contrast, 1 = first post-contrast, ...)."""
    subtraction: bool = False
    """Append the post1 - pre subtraction as an extra channel (needs phases 0 and 1)."""
    spacing: tuple[float, float, float] | None = None
    """Resample to this voxel spacing in mm (RAS order); None keeps each case's own grid."""
    crop_to_breast: bool = False
    """Crop to the breast box of the patient-info JSON before anything else."""
    breast_margin: int = 0
    """Voxels added on every side of the breast box when cropping."""
    patch_size: tuple[int, int, int] | None = None
    """Train on random patches of this size (``pos_fraction`` of them on tumour); None: whole volumes."""
    samples_per_case: int = 2
    """Patches drawn per loaded case when ``patch_size`` is set."""
    pos_fraction: float = 0.5
    """Fraction of patches centred on tumour voxels (the rest on background)."""
    augment: bool = True
    """Random flips, small affine and intensity changes at training time (never at val/test time)."""
    affine_prob: float = 0.2
    """Probability of the random rotation/scaling per sample (the costliest augmentation on CPU workers)."""
    divisor: int = 16
    """Spatial sizes are padded to multiples of this (the network's total stride)."""

    def __post_init__(self) -> None:
        phases = tuple(int(p) for p in self.phases)
        if not phases or min(phases) < 0 or len(set(phases)) != len(phases):
            raise ValueError(f"phases must be distinct non-negative indices, got {self.phases!r}")
        object.__setattr__(self, "phases", phases)
        if self.subtraction and not {0, 1} <= set(phases):
            raise ValueError("subtraction (post1 - pre) needs phases 0 and 1 among the loaded phases")
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", tuple(int(s) for s in self.patch_size))
            if len(self.patch_size) != 3 or any(s % self.divisor for s in self.patch_size):
                raise ValueError(
                    f"patch_size must be 3 sizes divisible by {self.divisor} (the network stride), "
                    f"got {self.patch_size}"
                )
        if not 0.0 <= self.pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must lie in [0, 1], got {self.pos_fraction}")
        if not 0.0 <= self.affine_prob <= 1.0:
            raise ValueError(f"affine_prob must lie in [0, 1], got {self.affine_prob}")

    @property
    def in_channels(self) -> int:
        return len(self.phases) + int(self.subtraction)

    def preprocessing_key(self) -> str:
        """A short hash of the fields that shape the cached (deterministic) output."""
        keys = ("phases", "subtraction", "spacing", "crop_to_breast", "breast_margin", "patch_size", "divisor")
        payload = json.dumps({k: asdict(self)[k] for k in keys}, sort_keys=True, default=list)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------


def breast_box(info: Mapping[str, Any], shape: Sequence[int] | None = None,
               margin: int = 0) -> tuple[int, int, int, int, int, int] | None:
    """The breast box of a patient-info JSON as (i0, i1, j0, j1, k0, k1) on the NIfTI array (nibabel order).

    MAMA-MIA's coordinates index the SimpleITK array, whose axes are the NIfTI axes reversed: its
    ``x_min:x_max`` slices array axis 0 of ``sitk.GetArrayFromImage`` = NIfTI axis k, ``y`` = j and ``z`` = i
    (the organisers' ``apply_breast_mask`` does ``seg[x_min:x_max, y_min:y_max, z_min:z_max]`` on that
    array). Upper bounds are exclusive, as Python slices. Returns None when the JSON has no box.
    """
    coords = (info.get("primary_lesion") or {}).get("breast_coordinates") or {}
    keys = ("x_min", "x_max", "y_min", "y_max", "z_min", "z_max")
    if not all(coords.get(k) is not None for k in keys):
        return None
    try:
        c = {k: int(coords[k]) for k in keys}
    except (TypeError, ValueError):
        return None
    box = [c["z_min"] - margin, c["z_max"] + margin, c["y_min"] - margin, c["y_max"] + margin,
           c["x_min"] - margin, c["x_max"] + margin]
    if shape is not None:
        for a in range(3):
            box[2 * a] = max(0, min(box[2 * a], int(shape[a])))
            box[2 * a + 1] = max(box[2 * a], min(box[2 * a + 1], int(shape[a])))
    if any(box[2 * a + 1] <= box[2 * a] for a in range(3)):
        return None
    return (box[0], box[1], box[2], box[3], box[4], box[5])


def make_records(
    cohort: Cohort, patient_ids: Sequence[str], spec: DataSpec, require_mask: bool = True
) -> list[dict[str, Any]]:
    """One MONAI data dict per case: phase paths, mask path (when present), ``patient_id`` and breast box.

    Raises naming the case when it lacks a needed phase or a mask (``require_mask``). With
    ``crop_to_breast``, a case whose JSON has no usable breast box, or whose box holds none of its tumour,
    uses the whole volume (one warning names them).
    """
    records: list[dict[str, Any]] = []
    whole: list[str] = []  # crop_to_breast cases that fall back to the whole volume, with the reason
    for pid in patient_ids:
        if pid not in cohort.cases:
            raise ValueError(f"case {pid!r} is not in the cohort at {cohort.root} (excluded or misspelt?)")
        case = cohort.cases[pid]
        missing = [p for p in spec.phases if p >= len(case.image_paths)]
        if missing:
            raise ValueError(
                f"case {pid} has {len(case.image_paths)} phases but phases {list(spec.phases)} were asked for; "
                "choose phases every case has (each case has at least 0, 1, 2)"
            )
        rec: dict[str, Any] = {IMAGE: [str(case.image_paths[p]) for p in spec.phases], PID: str(pid)}
        if case.mask_path is not None:
            rec[LABEL] = str(case.mask_path)
        elif require_mask:
            raise ValueError(f"case {pid} has no expert segmentation; it cannot be used for training/validation")
        if spec.crop_to_breast:
            box, why = _crop_box(cohort, pid, spec.breast_margin)
            if why:
                whole.append(f"{pid} ({why})")
            rec[BOX] = list(box)
        records.append(rec)
    if whole:
        import warnings

        # one bad JSON must not stop a whole run, nor may a box beside the tumour train on an empty label
        warnings.warn(f"crop_to_breast: {len(whole)} case(s) use the whole volume instead of the breast box: "
                      f"{'; '.join(whole[:10])}{' ...' if len(whole) > 10 else ''}; fix their patient_info JSON",
                      stacklevel=2)
    return records


def _crop_box(cohort: Cohort, pid: str, margin: int) -> tuple[tuple[int, ...], str]:
    """(box to crop case ``pid`` to, why it is the whole volume or ''): the JSON's breast box, or the whole
    volume when the JSON has no usable box or the box holds none of the expert mask's tumour."""
    from divaware.cohort import box_holds_tumour

    case = cohort.cases[pid]
    geo = cohort.geometry.loc[pid] if pid in cohort.geometry.index else None
    if geo is not None and all(k in geo.index for k in ("nx", "ny", "nz")):
        shape = (int(geo["nx"]), int(geo["ny"]), int(geo["nz"]))
    else:
        import nibabel as nib

        shape = tuple(int(v) for v in nib.load(str(case.image_paths[0])).shape[:3])
    whole = (0, shape[0], 0, shape[1], 0, shape[2])
    box = breast_box(case.info, margin=margin)
    if box is None:
        return whole, "no usable primary_lesion.breast_coordinates in its patient_info JSON"
    tumour = geo.get("tumour_box") if geo is not None else None
    if isinstance(tumour, (list, tuple)) and len(tumour) == 6 and not box_holds_tumour(box, tumour):
        return whole, f"breast box {list(box)} holds no tumour voxel"
    return box, ""


# --------------------------------------------------------------------------------------------------
# custom transforms
# --------------------------------------------------------------------------------------------------


class CropToBoxd(MapTransform, InvertibleTransform):
    """Crop ``keys`` to the per-case box stored under ``box_key`` (i0, i1, j0, j1, k0, k1); invertible.

    A single MONAI ``Crop`` instance does the work so that ``Invertd`` can pad the prediction back to the
    file's grid (MONAI matches inverse operations to the transform instance that recorded them).
    """

    def __init__(self, keys: Sequence[str], box_key: str = BOX, allow_missing_keys: bool = True) -> None:
        from monai.transforms import Crop

        super().__init__(keys, allow_missing_keys)
        self.box_key = box_key
        self.cropper = Crop()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        box = d.pop(self.box_key, None)
        if box is None:
            raise ValueError(f"case {d.get(PID, '?')}: no breast box to crop to")
        for key in self.key_iterator(d):
            shape = d[key].shape[1:]
            b = [int(v) for v in box]
            # clamp to the image so a box drawn slightly outside the grid still crops sensibly
            slices = tuple(slice(max(0, min(b[2 * a], shape[a])), max(0, min(b[2 * a + 1], shape[a])))
                           for a in range(3))
            if any(s.stop <= s.start for s in slices):
                raise ValueError(f"case {d.get(PID, '?')}: breast box {b} lies outside the image {tuple(shape)}")
            d[key] = self.cropper(d[key], slices)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper.inverse(d[key])
        return d


class ForegroundIndicesd(MapTransform):
    """Store the flat indices of the label's foreground voxels under ``out_key`` (int64 tensor).

    Deterministic, so it is cached with the preprocessing: patch sampling then never scans the whole
    label volume again (on a 320 x 320 x 128 case that scan costs about as much as reading the case).
    """

    def __init__(self, label_key: str = LABEL, out_key: str = "label_fg") -> None:
        super().__init__([label_key])
        self.label_key, self.out_key = label_key, out_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = torch.as_tensor(d[self.label_key])
        d[self.out_key] = torch.nonzero(label[0].flatten() > 0).flatten().to(torch.int64)
        return d


class RandPosNegPatchesd(Randomizable, MapTransform):
    """``num_samples`` random patches per case: centred on a tumour voxel with probability ``pos_fraction``,
    else on a uniformly random voxel (background in > 99 % of draws for MAMA-MIA tumours).

    The idea of MONAI's ``RandCropByPosNegLabeld`` with cached foreground indices (``ForegroundIndicesd``)
    and no background index list, which for a full-size case would hold ~10^7 entries. Patches are shifted to
    lie inside the (already padded) volume. Returns a list of dicts, which MONAI's collate flattens.
    """

    def __init__(self, keys: Sequence[str], spatial_size: Sequence[int], num_samples: int,
                 pos_fraction: float, fg_key: str = "label_fg") -> None:
        MapTransform.__init__(self, keys)
        self.size = tuple(int(s) for s in spatial_size)
        self.num_samples = int(num_samples)
        self.pos_fraction = float(pos_fraction)
        self.fg_key = fg_key

    def randomize(self, data: Any = None) -> None:  # draws happen per patch in __call__
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        fg = d.pop(self.fg_key, None)
        shape = tuple(int(s) for s in d[self.first_key(d)].shape[1:])
        if any(s < p for s, p in zip(shape, self.size, strict=True)):
            raise ValueError(f"case {d.get(PID, '?')}: volume {shape} smaller than the patch {self.size}; pad first")
        out = []
        for _ in range(self.num_samples):
            if fg is not None and len(fg) and self.R.rand() < self.pos_fraction:
                centre = np.unravel_index(int(fg[self.R.randint(len(fg))]), shape)
            else:
                centre = tuple(self.R.randint(s) for s in shape)
            start = [min(max(int(c) - p // 2, 0), s - p) for c, p, s in zip(centre, self.size, shape, strict=True)]
            sl = (slice(None), *(slice(a, a + p) for a, p in zip(start, self.size, strict=True)))
            sample = dict(d)
            for key in self.key_iterator(d):
                sample[key] = d[key][sl]
            out.append(sample)
        return out


class SubtractionChanneld(MapTransform):
    """Append phase(1) - phase(0) as the last channel of ``key`` (raw intensities, before normalisation)."""

    def __init__(self, key: str, pre_channel: int, post_channel: int) -> None:
        super().__init__([key])
        self.pre, self.post = int(pre_channel), int(post_channel)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            sub = img[self.post: self.post + 1] - img[self.pre: self.pre + 1]
            d[key] = torch.cat([img, sub], dim=0)
        return d


def normalise(keys: Sequence[str] = (IMAGE,)) -> Any:
    """THE intensity normalisation, used by training, validation and inference alike.

    Per case and per channel, z-score over the nonzero voxels (zero padding/background stays 0): robust
    to the vendor/site-dependent raw scales and independent of cropping to a patch, because it runs on
    the whole (optionally breast-cropped) volume before any patch is drawn.
    """
    from monai.transforms import NormalizeIntensityd

    return NormalizeIntensityd(keys=list(keys), nonzero=True, channel_wise=True)


def preprocessing(spec: DataSpec, with_label: bool = True) -> list[Any]:
    """The deterministic steps (module docstring, 1-5) every mode shares; cached by the datasets."""
    from monai.transforms import (
        AsDiscreted,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        Spacingd,
    )

    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    steps: list[Any] = [
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True, ensure_channel_first=True,
                   dtype=np.float32, allow_missing_keys=True),
    ]
    if spec.crop_to_breast:
        steps.append(CropToBoxd(keys))
    steps.append(Orientationd(keys=keys, axcodes="RAS", labels=None, allow_missing_keys=True))
    if spec.spacing is not None:
        steps.append(Spacingd(keys=keys, pixdim=spec.spacing, mode=["bilinear", "nearest"][: len(keys)],
                              allow_missing_keys=True))
    if spec.subtraction:
        steps.append(SubtractionChanneld(IMAGE, spec.phases.index(0), spec.phases.index(1)))
    steps.append(normalise([IMAGE]))
    if with_label:
        # masks are 0/1 but some tools write 0/255 or interpolated values: make them strictly binary
        steps.append(AsDiscreted(keys=[LABEL], threshold=0.5, allow_missing_keys=True))
    steps.append(EnsureTyped(keys=keys, dtype=torch.float32, allow_missing_keys=True))
    return steps


def train_transforms(spec: DataSpec) -> Any:
    """Preprocessing + padding or patch sampling + augmentations, for the training split only."""
    from monai.transforms import Compose, DivisiblePadd, SpatialPadd

    keys = [IMAGE, LABEL]
    steps = preprocessing(spec, with_label=True)
    if spec.patch_size is None:
        # deterministic, so it is cached with the preprocessing; batches of unequal volumes are padded
        # further by the collate function
        steps.append(DivisiblePadd(keys=keys, k=spec.divisor, method="end"))
    else:
        steps.append(SpatialPadd(keys=keys, spatial_size=spec.patch_size, method="end"))
        steps.append(ForegroundIndicesd(LABEL))  # cached: no full-volume scan per patch
        steps.append(RandPosNegPatchesd(keys, spec.patch_size, spec.samples_per_case, spec.pos_fraction))
    return Compose(steps + augmentations(spec))


def augmentations(spec: DataSpec) -> list[Any]:
    """The random augmentations of training (none when ``spec.augment`` is off); shared by the in-memory
    pipeline and the preprocessed store (:mod:`divaware.preprocess`)."""
    from monai.transforms import RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

    if not spec.augment:
        return []
    keys = [IMAGE, LABEL]
    return [
        # RAS axis 0 is left-right: the breasts are mirror images, so this flip is anatomically plausible
        RandFlipd(keys=keys, spatial_axis=0, prob=0.5),
        RandAffined(keys=keys, prob=spec.affine_prob, rotate_range=(0.0, 0.0, math.radians(10)),
                    scale_range=(0.1, 0.1, 0.1), mode=["bilinear", "nearest"], padding_mode="zeros"),
        RandScaleIntensityd(keys=[IMAGE], factors=0.1, prob=0.5),
        RandShiftIntensityd(keys=[IMAGE], offsets=0.1, prob=0.5),
    ]


def eval_transforms(spec: DataSpec, with_label: bool = True) -> Any:
    """Preprocessing only: validation (with masks) and inference (``with_label=False``)."""
    from monai.transforms import Compose

    return Compose(preprocessing(spec, with_label=with_label))


# --------------------------------------------------------------------------------------------------
# datasets and loaders
# --------------------------------------------------------------------------------------------------


def estimate_cache_bytes(records: Sequence[Mapping[str, Any]], spec: DataSpec) -> int:
    """Bytes the cached (float32) preprocessed cases would take, from the NIfTI headers only."""
    import nibabel as nib

    total = 0
    for rec in records:
        img = nib.load(rec[IMAGE][0])  # lazy: reads the header, not the voxels
        shape = np.asarray(img.shape[:3], dtype=float)
        if BOX in rec:
            b = rec[BOX]
            shape = np.minimum(shape, [b[1] - b[0], b[3] - b[2], b[5] - b[4]])
        voxels = float(np.prod(shape))
        if spec.spacing is not None:
            # resampling keeps the physical extent: voxel count scales with the voxel-volume ratio
            voxels *= float(np.prod(img.header.get_zooms()[:3])) / float(np.prod(spec.spacing))
        total += int(voxels * 4 * (spec.in_channels + (1 if LABEL in rec else 0)))
    return total


def _record_hash(record: Mapping[str, Any], transform_key: str = "") -> bytes:
    """Disk-cache key: the record plus size and mtime of its files, so an edited input is never stale, and
    ``transform_key`` (:func:`_transform_key`): a case cached by the validation transforms (no padding, no
    foreground indices) must never be served to training, nor the reverse."""
    stamp: list[Any] = []
    for value in record.values():
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str) and os.path.exists(path):
                st = os.stat(path)
                stamp.append((path, st.st_size, st.st_mtime_ns))
    payload = json.dumps({"record": record, "files": stamp, "transforms": transform_key}, sort_keys=True,
                         default=str)
    return hashlib.md5(payload.encode()).hexdigest().encode()


def _transform_key(transform: Any) -> str:
    """The deterministic steps PersistentDataset caches (those before the first random one), with their
    settings: which mode's pipeline produced a cached case."""
    from monai.transforms import Compose

    steps = transform.transforms if isinstance(transform, Compose) else [transform]
    names = []
    for step in steps:
        if isinstance(step, Randomizable):
            break
        names.append(f"{type(step).__name__}:{sorted(getattr(step, 'keys', ()) or ())}")
    return "|".join(names)


def resolve_cache(cache: str, records: Sequence[Mapping[str, Any]], spec: DataSpec,
                  max_memory_bytes: float) -> str:
    """The cache mode a run uses: ``auto`` -> ``memory`` when the float32 cases fit ``max_memory_bytes``
    (the CPU-sized synthetic cohort: unchanged, bit for bit), else the shared preprocessed store
    (:mod:`divaware.preprocess`) for patch training, or ``disk`` for whole-volume training."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache != "auto":
        return cache
    if estimate_cache_bytes(records, spec) <= max_memory_bytes:
        return "memory"
    return "disk" if spec.patch_size is None else "preprocessed"


def make_dataset(
    records: Sequence[Mapping[str, Any]],
    transform: Any,
    cache: str,
    cache_dir: str | Path | None = None,
    spec: DataSpec | None = None,
    *,
    max_memory_bytes: float,
    num_workers: int,
) -> Any:
    """A MONAI dataset caching the deterministic part of ``transform`` (without MONAI's progress bar).

    ``cache``: ``memory`` (``CacheDataset``), ``disk`` (``PersistentDataset`` in ``cache_dir``, keyed by the
    preprocessing settings so different settings never share files), ``none``, or ``auto``: memory when the
    estimated cache fits ``max_memory_bytes``, else disk. Real MAMA-MIA (about 190 GB as float32) always
    ends up on disk.
    """
    from monai.data import CacheDataset, Dataset, PersistentDataset

    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache == "preprocessed":
        raise ValueError("cache='preprocessed' builds both splits at once: use divaware.preprocess.make_datasets")
    records = [dict(r) for r in records]
    if cache == "auto":
        need = estimate_cache_bytes(records, spec or DataSpec())
        cache = "memory" if need <= max_memory_bytes else "disk"
    if cache == "memory":
        # MONAI's "Loading dataset" bar is plain-text tqdm on stderr, drawn in Jupyter as red boxes that read
        # as errors: never shown (the training loop's own tqdm.auto bars report progress when asked)
        return CacheDataset(records, transform, cache_rate=1.0, num_workers=max(1, num_workers), progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir (under the run folder, never the input data)")
        folder = Path(cache_dir) / (spec or DataSpec()).preprocessing_key()
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(records, transform, cache_dir=folder,
                                 hash_func=partial(_record_hash, transform_key=_transform_key(transform)))
    return Dataset(records, transform)


def make_loader(
    dataset: Any,
    batch_size: int,
    shuffle: bool,
    seed: int,
    *,
    num_workers: int,
    pin_memory: bool = False,
    pad_batch: bool = True,
    batches: list[list[int]] | None = None,
) -> Any:
    """A MONAI ``DataLoader`` whose order and augmentations depend only on ``seed``.

    ``batches``: fixed batches of dataset positions (a batch sampler; ``batch_size`` and ``shuffle`` are
    then unused), as the training loop uses (see :meth:`divaware.distributed.Ranks.train_loader`).

    Build a new loader per epoch with ``seed`` derived from (run seed, epoch): the sampler draws from a
    generator seeded with it, and MONAI seeds the random transforms from the same generator (in the main
    process or in each worker), so an epoch replays exactly after a resume. ``pad_batch`` pads unequal
    whole volumes of one batch to a common size (at the end, with zeros).
    """
    from monai.data import DataLoader, list_data_collate

    generator = torch.Generator()
    generator.manual_seed(int(seed))
    collate = _padding_collate if pad_batch else list_data_collate
    order: dict[str, Any] = ({"batch_size": batch_size, "shuffle": shuffle, "drop_last": False}
                             if batches is None else {"batch_sampler": batches})
    return DataLoader(
        dataset,
        **order,
        num_workers=num_workers,
        generator=generator,
        collate_fn=collate,
        pin_memory=pin_memory,
        # workers are restarted every epoch so their random streams are re-seeded from the generator
        persistent_workers=False,
    )


def _padding_collate(items: Sequence[Mapping[Hashable, Any]]) -> Any:
    """MONAI's ``pad_list_data_collate`` (pad at the end) on shallow copies of the samples: it writes the
    padded tensors back into the sample dicts it is given, which for a memory cache without random
    transforms are the cached dicts themselves, so a case's size would depend on the batches it was in."""
    from monai.data import pad_list_data_collate

    return pad_list_data_collate([dict(item) for item in items], method="end")


def batch_ids(batch: Mapping[str, Any]) -> list[str]:
    """The ``patient_id`` of each sample of a collated batch, as a list of strings."""
    ids = batch[PID]
    if isinstance(ids, str):
        return [ids]
    return [str(i) for i in ids]

