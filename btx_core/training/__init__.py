"""Training: the loop, resumable training state, FLOPs accounting."""
