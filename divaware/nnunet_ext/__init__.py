"""A folder for nnU-Net's ``nnUNet_extTrainer`` search path (see :func:`divaware.nnunet.ext_trainer_path`)."""
