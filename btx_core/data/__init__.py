"""Data: sources, the held-out split, tokenization and packing, the prepared-data cache."""
