"""Helpers the tests share that are not fixtures: a real pretrained seed (real_seed)."""
