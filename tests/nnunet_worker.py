"""Run in a Python that has nnunetv2 (``pip install divaware[nnunet]``): a few training steps of
nnUNetTrainerDivaware on a preprocessed dataset, on CPU, printing one JSON line per step.

    python tests/nnunet_worker.py DATASET_ID WEIGHTS_CSV STEPS    (nnUNet_raw/_preprocessed/_results set)

Each line: the batch's case identifiers, the weights' scale α + (1 − α)w, the per-case losses, the loss the
trainer back-propagated, and the plain mean of the per-case losses (what an unweighted loss would be).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from divaware.nnunet import nnUNetTrainerDivaware


def main(dataset: str, weights_csv: str, steps: int) -> None:
    os.environ["DIVAWARE_WEIGHTS"] = weights_csv
    torch.manual_seed(0)
    # built as nnunetv2.run.run_training.get_trainer_from_args builds it (its search by class name imports
    # every trainer module, some of which need torchvision, which has no CPU wheel in this environment)
    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(int(dataset)))
    plans = load_json(join(folder, "nnUNetPlans.json"))
    plans["continue_training"] = False
    trainer = nnUNetTrainerDivaware(plans=plans, configuration="3d_fullres", fold=0,
                                    dataset_json=load_json(join(folder, "dataset.json")), device=torch.device("cpu"))
    # the class nnU-Net's search of $nnUNet_extTrainer finds (as find_objects calls it for external paths)
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from divaware.nnunet import ext_trainer_path

    ext = str(ext_trainer_path())
    found = recursive_find_python_class(ext, "nnUNetTrainerDivaware", None, base_folder=ext,
                                        cleanup_imports_from_base_folder=True)
    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch, trainer.num_epochs = steps, 1, 1
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    for _ in range(steps):
        out = trainer.train_step(next(trainer.dataloader_train))
        step = trainer.last_step
        print(json.dumps({"class": type(trainer).__name__, "ext_found": found is type(trainer), "keys": step["keys"], "scale": step["scale"].tolist(),
                          "case_loss": step["case_loss"].tolist(), "loss": float(out["loss"]),
                          "alpha": trainer.alpha}), flush=True)
    # stop nnU-Net's loader threads/processes so the worker exits
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        if hasattr(loader, "_finish"):
            loader._finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
