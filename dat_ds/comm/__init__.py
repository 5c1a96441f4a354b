"""Compressed gradient aggregation: codec (pure torch), transport (the only torch.distributed caller), and the
seam that puts them inside the DeepSpeed engine (engine_seam.py)."""
