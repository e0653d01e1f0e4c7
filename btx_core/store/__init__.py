"""The object store: locations, atomic commits, manifests, checkpoints, transfers, and where each stage's output lives."""
