"""Measuring a stim model: one evaluation of the full network and a sub-network panel, BN
re-estimation per sub-network, FLOPs, and the loafing plot."""
