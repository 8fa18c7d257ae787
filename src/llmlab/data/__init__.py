"""Data: real corpora found on disk (sources.py). Token shards, packing and SFT formats come with training."""
