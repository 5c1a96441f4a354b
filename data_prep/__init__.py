"""Converters from the datasets' own formats to dat-ds shards (see dat_ds/data/shards.py)."""
