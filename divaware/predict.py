"""Inference: ``predict(run_dir, data_root, split="test", out_dir)`` writes the challenge's submission layout.

For every case of the split, the run's own preprocessing (:func:`divaware.data.eval_transforms`, the same
definition training used) prepares the image; the network predicts on that grid, whole-volume or by
sliding window; MONAI ``Invertd`` undoes resampling, reorientation and the breast crop; the mask is written
as ``<out_dir>/pred_segmentations/<patient_id>.nii.gz`` (uint8 0/1) with the source image's affine and
shape. Cases need no expert mask. Optional postprocessing (``POSTPROCESS``) runs on the final grid:
``largest_component`` keeps the largest 26-connected component, ``breast_box`` zeroes everything outside
the breast box of the patient-info JSON.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from divaware import data as D
from divaware.model import check_inference_memory, infer, segment
from divaware.outputs import ensure_writable
from divaware.runfolder import RunFolder, atomic_write
from divaware.split import run_val_ids
from divaware.train import TrainConfig, resolve_device

POSTPROCESS = ("largest_component", "breast_box")
PRED_FOLDER = "pred_segmentations"


def load_run_model(run_dir: str | Path, checkpoint: str = "best",
                   device: str | torch.device = "cpu") -> tuple[TrainConfig, torch.nn.Module]:
    """The run's config and its network with the weights of ``best.pt`` (or ``last.pt``), in eval mode.

    ``checkpoint="best"`` falls back to ``last.pt`` with a warning when the run never validated.
    """
    run = RunFolder(run_dir)
    if not run.is_run():
        raise ValueError(f"{run.path} is not a training run folder (no {run.CONFIG})")
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    path = run.checkpoint(checkpoint)
    config = TrainConfig.from_yaml(run.config)
    if run.checkpoint_to_use(checkpoint) != path:
        warnings.warn(f"{path} not found; using {run.LAST}", stacklevel=2)
        path = run.last
    if not path.is_file():
        raise ValueError(f"{run.path} holds no checkpoint ({path.name}); train the run first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError("not a divaware checkpoint (no model weights)")
        model = config.build_model()
        model.load_state_dict(state["model"])
    except Exception as err:  # a truncated, empty or foreign file: one line naming it and what to use instead
        size = path.stat().st_size if path.exists() else 0
        first = str(err).splitlines()[0] if str(err) else ""
        other = run.last if path == run.best else run.best
        hint = (f"{other.name} is there: try --checkpoint {other.stem}, or " if other.is_file() else "")
        raise ValueError(f"{path} is damaged or not this run's checkpoint ({size} bytes; {type(err).__name__}: "
                         f"{first[:200]}); {hint}train the run again") from None
    return config, model.to(device).eval()


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected foreground component (an empty mask stays empty)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def restrict_to_box(mask: np.ndarray, info: dict) -> np.ndarray:
    """Zero the mask outside the patient-info breast box (unchanged when the JSON has no box)."""
    box = D.breast_box(info, mask.shape)
    if box is None:
        return mask
    out = np.zeros_like(mask)
    sl = (slice(box[0], box[1]), slice(box[2], box[3]), slice(box[4], box[5]))
    out[sl] = mask[sl]
    return out


def predict(
    run_dir: str | Path,
    data_root: str | Path,
    split: str | None = "test",
    out_dir: str | Path | None = None,
    checkpoint: str = "best",
    sliding_window: bool | None = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    postprocess: Sequence[str] = (),
    device: str = "auto",
    patient_ids: Sequence[str] | None = None,
    num_workers: int = 0,
    progress: bool = True,
    cpu_threads: int | None = None,
) -> Path:
    """Predict every case of ``split`` (None: all cases) of the cohort at ``data_root``; returns ``out_dir``.

    ``sliding_window``: None chooses it when the run trained on patches (window = ``roi_size`` or the patch
    size); False runs whole volumes. ``out_dir`` defaults to ``<run_dir>/predictions_<split>`` (with
    ``_<checkpoint>`` appended for checkpoints other than best) and must not lie inside the input data folder.
    ``patient_ids`` restricts the cases. ``cpu_threads``: torch CPU threads for this call (None: the run's
    ``cpu_threads`` setting; 0: torch's default).
    """
    if cpu_threads is not None and (isinstance(cpu_threads, bool) or int(cpu_threads) != cpu_threads
                                    or cpu_threads < 0):
        raise ValueError(f"cpu_threads must be a whole number >= 0 (0: torch's default, None: the run's "
                         f"setting), got {cpu_threads!r}")
    previous_threads = torch.get_num_threads()
    try:
        return _predict(run_dir, data_root, split, out_dir, checkpoint, sliding_window, roi_size, overlap,
                        postprocess, device, patient_ids, num_workers, progress, cpu_threads)
    finally:
        torch.set_num_threads(previous_threads)  # process-wide: leave it as found


def _predict(run_dir: str | Path, data_root: str | Path, split: str | None, out_dir: str | Path | None,
             checkpoint: str, sliding_window: bool | None, roi_size: Sequence[int] | None, overlap: float,
             postprocess: Sequence[str], device: str, patient_ids: Sequence[str] | None, num_workers: int,
             progress: bool, cpu_threads: int | None) -> Path:
    from monai.data import Dataset, MetaTensor
    from monai.transforms import Invertd
    from tqdm.auto import tqdm

    from divaware.cohort import load_cohort

    run_dir = Path(run_dir)
    unknown = sorted(set(postprocess) - set(POSTPROCESS))
    if unknown:
        raise ValueError(f"unknown postprocessing {unknown}; choose from {POSTPROCESS}")
    dev = resolve_device(device)
    config, model = load_run_model(run_dir, checkpoint, dev)
    threads = config.cpu_threads if cpu_threads is None else cpu_threads
    if threads > 0:
        torch.set_num_threads(int(threads))
    spec = config.data_spec()
    if sliding_window is None:
        sliding_window = spec.patch_size is not None
    roi = None
    if roi_size is not None and (len(roi_size) != 3 or any(int(r) < 1 for r in roi_size)):
        raise ValueError(f"roi_size must be 3 window sizes >= 1 voxel, got {list(roi_size)}")
    if sliding_window:
        roi = list(roi_size or spec.patch_size or (128, 128, 128))
    use_amp = dev.type == "cuda" and config.amp in ("auto", "bf16")

    data_root = Path(data_root).resolve()
    # The checkpoint is part of the default folder name so that predicting with "last" never overwrites
    # the predictions of "best".
    run = RunFolder(run_dir)
    out = Path(out_dir) if out_dir is not None else run.predictions_dir(split, checkpoint)
    if out.resolve().is_relative_to(data_root):
        raise ValueError(f"out_dir {out} lies inside the input data folder {data_root}; input data is read-only")
    # inference needs no expert masks; the voxel checks are those of `divaware check`, cached in the run folder
    cohort = load_cohort(data_root, require_masks=False, voxel_cache=run.voxel_cache(data_root=data_root),
                         phases=spec.phases)
    if patient_ids is not None:
        ids = list(patient_ids)
    elif split == "val":
        ids = run_val_ids(run_dir, cohort)
    else:
        ids = cohort.ids(split)
    if not ids:
        raise ValueError(f"no cases in split {split!r} of {data_root}")
    records = D.make_records(cohort, ids, spec, require_mask=False)
    for rec in records:
        rec.pop(D.LABEL, None)  # inference never reads the expert mask
    transforms = D.eval_transforms(spec, with_label=False)
    inverter = Invertd(keys="pred", transform=transforms, orig_keys=D.IMAGE, nearest_interp=True)
    # batch_size=None: no collation, each item arrives as the dict the transforms made (meta intact)
    loader = torch.utils.data.DataLoader(Dataset(records, transforms), batch_size=None, shuffle=False,
                                         num_workers=num_workers)
    pred_dir = ensure_writable(out / PRED_FOLDER, "out_dir")  # read-only/full: one line before any work

    import nibabel as nib

    for item in tqdm(loader, total=len(records), desc="predict", unit="case", disable=not progress):
        pid = item[D.PID]
        image: MetaTensor = item[D.IMAGE]
        check_inference_memory(tuple(image.shape), roi, config.channels, spec.in_channels, dev,
                               strides=config.strides, what=f" of case {pid}")
        logits = infer(model, image.as_subclass(torch.Tensor)[None].to(dev), divisor=spec.divisor,
                       roi_size=roi, overlap=overlap, amp=use_amp)
        mask = segment(logits)[0].to(torch.float32).cpu()
        pred = MetaTensor(mask[None], meta=dict(image.meta), applied_operations=list(image.applied_operations))
        restored = inverter({"pred": pred, D.IMAGE: image})["pred"]
        arr = np.asarray(restored[0].as_subclass(torch.Tensor).numpy() > 0.5, dtype=np.uint8)
        case = cohort.cases[pid]
        ref = nib.load(str(case.image_paths[spec.phases[0]]))
        if arr.shape != tuple(ref.shape[:3]):
            raise RuntimeError(f"case {pid}: restored prediction has shape {arr.shape}, image {ref.shape}")
        if "largest_component" in postprocess:
            arr = largest_component(arr).astype(np.uint8)
        if "breast_box" in postprocess:
            arr = restrict_to_box(arr, case.info)
        header = ref.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        img = nib.Nifti1Image(arr, ref.affine, header=header)
        atomic_write(pred_dir / f"{pid}.nii.gz", lambda tmp, img=img: nib.save(img, tmp), suffix=".nii.gz")
    return out

