"""Compressed gradient aggregation: the codecs (pure torch), the transport (the only code that moves gradients
between ranks) and the seam that puts them inside the DeepSpeed engine (engine_seam.py, overlap.py)."""
