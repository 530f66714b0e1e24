"""nnU-Net v2 with divaware's per-case weights: a dataset converter and a trainer that weights each case's loss.

Optional extra: ``pip install divaware[nnunet]`` (nnunetv2 ≥ 2.5). This module imports without nnunetv2;
only the trainer class needs it (:data:`nnUNetTrainerDivaware` is built on first access).

Recipe (the weights come from an audit of held-out *training* cases, e.g. nnU-Net's own out-of-fold
validation predictions, never from the test split)::

    python -c "from divaware.nnunet import to_nnunet_raw; to_nnunet_raw('/data/MAMA-MIA', '$nnUNet_raw', 901)"
    nnUNetv2_plan_and_preprocess -d 901 -c 3d_fullres --verify_dataset_integrity
    divaware audit --data /data/MAMA-MIA --predictions oof_predictions/ --split train --out audit_oof
    divaware weights --audit audit_oof --out weights.csv
    export nnUNet_extTrainer=$(python -c "import divaware.nnunet as n; print(n.ext_trainer_path())")
    export DIVAWARE_WEIGHTS=$PWD/weights.csv DIVAWARE_ALPHA=0.5
    nnUNetv2_train 901 3d_fullres 0 -tr nnUNetTrainerDivaware

(``nnUNet_extTrainer`` is how recent nnU-Net releases, 2.8.1 included, find trainers outside their package.
nnU-Net searches its own trainer folder first, importing each module in turn, and its Primus trainers import
timm and so torchvision: on an installation whose torchvision does not import with its torch (a CPU-only
torch beside a CUDA torchvision wheel) that search fails before it reaches ``nnUNet_extTrainer``. Then, and
with nnU-Net < 2.6, use :func:`install_trainer` instead: it copies ``nnunet_ext/divaware_trainer.py`` into
``nnunetv2/training/nnUNetTrainer/``, where the search finds it before it descends into the subfolders
that hold the Primus trainers.)

The trainer replaces the batch loss of :class:`nnUNetTrainer` by divaware's objective (DESIGN.md):
for a batch of B cases with per-case losses ℓᵢ (nnU-Net's own loss, deep supervision included, on one case at
a time) and weights wᵢ of training-set mean 1, L = (1/B) Σ (α + (1 − α) wᵢ) ℓᵢ, i.e. α·mean ℓ + (1 − α)·mean wℓ.
Weights are looked up by the case identifier of each sample (``batch['keys']``), which
:func:`to_nnunet_raw` sets to the patient id; the lookup ignores case. With α = 1, or all weights 1, the loss is
the mean of per-case losses: for nnU-Net's batch Dice (``batch_dice=True`` configurations) that is a per-case
Dice, not the batch Dice of the stock trainer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["to_nnunet_raw", "ext_trainer_path", "install_trainer", "WEIGHTS_ENV", "ALPHA_ENV"]  # and nnUNetTrainerDivaware (lazy)

WEIGHTS_ENV = "DIVAWARE_WEIGHTS"
"""Environment variable naming the weights CSV (``divaware weights``) the trainer reads."""
ALPHA_ENV = "DIVAWARE_ALPHA"
"""Environment variable with α (default 0.5, divaware's training default)."""


def ext_trainer_path() -> Path:
    """The folder to put in ``nnUNet_extTrainer`` so that ``nnUNetv2_train -tr nnUNetTrainerDivaware`` finds it."""
    return Path(__file__).resolve().parent / "nnunet_ext"


def install_trainer(nnunet_trainer_folder: str | Path | None = None) -> Path:
    """Copy divaware's trainer file into nnU-Net's own trainer folder (``nnunetv2/training/nnUNetTrainer/``,
    found without importing nnU-Net's trainers, or ``nnunet_trainer_folder``); returns the file written.

    For installations where the ``nnUNet_extTrainer`` route fails (see the module docstring): nnU-Net's trainer
    search looks at the files of that folder before its subfolders, so ``-tr nnUNetTrainerDivaware`` is found
    before the imports that need torchvision. The copy imports :mod:`divaware.nnunet`, so it follows divaware
    updates; run this again after reinstalling nnU-Net (which removes it).
    """
    import importlib.util
    import shutil

    if nnunet_trainer_folder is None:
        spec = importlib.util.find_spec("nnunetv2")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("nnunetv2 is not installed in this Python: pip install \"divaware[nnunet]\" first")
        folder = Path(next(iter(spec.submodule_search_locations))) / "training" / "nnUNetTrainer"
    else:
        folder = Path(nnunet_trainer_folder).expanduser()
    if not (folder / "nnUNetTrainer.py").is_file():
        raise ValueError(f"{folder} is not nnU-Net's trainer folder (no nnUNetTrainer.py there)")
    target = folder / "divaware_trainer.py"
    shutil.copyfile(ext_trainer_path() / "divaware_trainer.py", target)
    return target


def to_nnunet_raw(data_root: str | Path, nnunet_raw: str | Path, dataset_id: int = 901, name: str = "MAMAMIA",
                  *, split: str | None = "train", patient_ids: Sequence[str] | None = None,
                  phases: Sequence[int] = (0, 1), link: bool = False) -> Path:
    """Write a MAMA-MIA folder (real or synthetic) in nnU-Net v2's raw format; returns the dataset folder.

    ``<nnunet_raw>/Dataset<id>_<name>/imagesTr/<patient_id>_<channel>.nii.gz`` (one channel per chosen phase,
    in ``phases`` order; default pre-contrast and first post-contrast), ``labelsTr/<patient_id>.nii.gz`` (the
    expert mask, label 1 = tumour) and ``dataset.json``. Cases come from the cohort as
    :func:`divaware.cohort.load_cohort` checks it (excluded cases are left out), of ``split`` (None: all) or
    ``patient_ids``. The patient id is the case identifier, so nnU-Net's predictions are
    ``<patient_id>.nii.gz`` and ``divaware audit`` reads them as they are. ``link``: symlink instead of copy.
    """
    import shutil

    from divaware.cohort import load_cohort

    root = Path(data_root).expanduser()
    if not (0 < int(dataset_id) < 1000):
        raise ValueError(f"dataset_id must be 1-999 (nnU-Net uses three digits), got {dataset_id}")
    folder = Path(nnunet_raw).expanduser() / f"Dataset{int(dataset_id):03d}_{name}"
    if folder.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"nnU-Net raw folder {folder} lies inside the data folder {root}; write it elsewhere")
    cohort = load_cohort(root)
    ids = [str(i) for i in patient_ids] if patient_ids is not None else cohort.ids(split)
    unknown = [i for i in ids if i not in cohort.cases]
    if unknown:
        raise ValueError(f"case(s) {unknown[:10]} are not usable cases of {root} (see `divaware check`)")
    phases = [int(p) for p in phases]
    short = [i for i in ids if len(cohort.cases[i].image_paths) <= max(phases)]
    if short:
        raise ValueError(f"case(s) {short[:10]} have fewer than {max(phases) + 1} phases; choose phases= that "
                         "every case has, or leave those cases out (patient_ids=)")
    no_mask = [i for i in ids if cohort.cases[i].mask_path is None]
    if no_mask:
        raise ValueError(f"case(s) {no_mask[:10]} have no expert mask and cannot be training cases")
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)

    def put(src: Path, dest: Path) -> None:
        dest.unlink(missing_ok=True)
        if link:
            dest.symlink_to(src.resolve())
        else:
            shutil.copyfile(src, dest)

    for pid in ids:
        case = cohort.cases[pid]
        for channel, phase in enumerate(phases):
            put(Path(case.image_paths[phase]), folder / "imagesTr" / f"{pid}_{channel:04d}.nii.gz")
        put(Path(case.mask_path), folder / "labelsTr" / f"{pid}.nii.gz")
    names = {0: "pre-contrast"} | {p: f"post-contrast {p}" for p in phases if p > 0}
    dataset = {
        # any name but "CT" gets nnU-Net's per-case z-score normalisation, right for MRI
        "channel_names": {str(c): names[p] for c, p in enumerate(phases)},
        "labels": {"background": 0, "tumour": 1},
        "numTraining": len(ids),
        "file_ending": ".nii.gz",
        "name": name,
        "description": f"MAMA-MIA layout from {root} converted by divaware.nnunet.to_nnunet_raw",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
    return folder


_TRAINER: Any = None


def _build_trainer() -> Any:
    try:
        import numpy as np
        import pandas as pd
        import torch
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.helpers import dummy_context
    except ImportError as err:
        raise ImportError(f"nnUNetTrainerDivaware needs nnU-Net v2: pip install 'divaware[nnunet]' ({err})") from err

    from divaware.external import mixed_weights, read_weights, weights_for
    from divaware.losses import combine

    class nnUNetTrainerDivaware(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming convention)
        """nnU-Net's trainer with each case's loss scaled by α + (1 − α)·w (module docstring).

        Weights: the CSV named by ``$DIVAWARE_WEIGHTS`` (read at construction), or :meth:`set_case_weights`.
        After each step, ``last_step`` holds the batch's ``keys``, ``scale`` (α + (1 − α)w) and ``case_loss``.
        """

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's signature)
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.case_weights = self.raw_weights = None
            from divaware.config import default

            self.alpha = float(os.environ.get(ALPHA_ENV, default("alpha")))  # the config's alpha unless set
            self.last_step: dict[str, Any] = {}
            if os.environ.get(WEIGHTS_ENV):
                self.set_case_weights(read_weights(os.environ[WEIGHTS_ENV]), self.alpha)

        def set_case_weights(self, weights: Any, alpha: float) -> None:
            """Use ``weights`` (a Series/mapping patient_id -> weight, e.g. :func:`read_weights`) with ``alpha``."""
            self.alpha = float(alpha)
            series = weights if isinstance(weights, pd.Series) else pd.Series(dict(weights), dtype=float)
            self.raw_weights = series
            self.case_weights = mixed_weights(series, self.alpha)

        def _weights(self, keys: Sequence[str]) -> np.ndarray:
            if self.case_weights is None:
                raise RuntimeError(f"nnUNetTrainerDivaware: no weights; set ${WEIGHTS_ENV} to the CSV written by "
                                   "`divaware weights`, or call set_case_weights()")
            return np.asarray(weights_for(self.raw_weights, [str(k) for k in keys]), dtype=float)

        def train_step(self, batch: dict) -> dict:
            data, target = batch["data"], batch["target"]
            weights = self._weights(batch["keys"])
            data = data.to(self.device, non_blocking=True)
            target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                      else target.to(self.device, non_blocking=True))

            def one(x: Any, i: int) -> Any:
                return [t[i:i + 1] for t in x] if isinstance(x, (list, tuple)) else x[i:i + 1]

            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
                output = self.network(data)
                # nnU-Net's own loss (deep supervision included), one case at a time
                case_loss = torch.stack([self.loss(one(output, i), one(target, i)) for i in range(data.shape[0])])
                # divaware's objective itself (global norm: case i's loss scaled by alpha + (1 - alpha) w_i)
                loss = combine(case_loss, weights, self.alpha, "global")
            # the stock trainer's backward pass, unchanged
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
                self.grad_scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
                self.optimizer.step()
            scale = self.alpha + (1.0 - self.alpha) * weights
            self.last_step = {"keys": [str(k) for k in batch["keys"]], "scale": scale,
                              "case_loss": case_loss.detach().float().cpu().numpy(),
                              "loss": float(loss.detach())}
            return {"loss": np.asarray(loss.detach().cpu().numpy())}

    # picklable and printed by its public name (it is reached through this module's __getattr__)
    nnUNetTrainerDivaware.__module__, nnUNetTrainerDivaware.__qualname__ = __name__, "nnUNetTrainerDivaware"
    return nnUNetTrainerDivaware


def __getattr__(name: str) -> Any:
    # Built on first access, so that importing this module (and the converter) never needs nnunetv2 or torch.
    global _TRAINER
    if name == "nnUNetTrainerDivaware":
        if _TRAINER is None:
            _TRAINER = _build_trainer()
        return _TRAINER
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
