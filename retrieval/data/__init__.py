"""Data: pair manifests and splits, image decoding, augmentation, the synthetic collection."""
