"""Mixture-of-Experts: MiX (experts -> one MoE), router initialisation, routing and load balancing, editing."""
