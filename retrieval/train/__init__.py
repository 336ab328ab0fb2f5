"""Training: the contrastive losses, batch augmentation, the loop and its checkpoints, locked towers' cached outputs."""
