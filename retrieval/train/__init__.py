"""Training: the contrastive losses, the loop, cached features of locked towers."""
