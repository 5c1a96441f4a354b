"""Webdataset shards: the on-disk format (shards.py), augmentation (transforms.py), streaming (loader.py)."""
