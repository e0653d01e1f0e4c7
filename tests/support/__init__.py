"""What the tests share that is not a fixture: the fault hook (faults.py) and the startup module
that arms it in the processes a test starts (startup/sitecustomize.py), and a real pretrained
seed (real_seed.py)."""
