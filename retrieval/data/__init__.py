"""Data: pair manifests and splits, image decoding and transforms, the synthetic collection."""
