"""Evaluation: held-out scores, routing counts, the BTM ensemble, report tables and plots."""
