"""nnU-Net finds trainers by class name in the folders of ``$nnUNet_extTrainer``; this file exposes
divaware's (:mod:`divaware.nnunet`). Copy it into ``nnunetv2/training/nnUNetTrainer/`` for nnU-Net < 2.6."""

from divaware.nnunet import nnUNetTrainerDivaware

__all__ = ["nnUNetTrainerDivaware"]
