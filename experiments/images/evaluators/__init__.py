"""Evaluators of a trained state, one per module, each ``run(setup, state, mesh, workdir)
-> dict``: ``bpd`` (test-set bits/dim), ``nfe`` (function evaluations of adaptive
sampling), ``fid`` (FID against the train split) and ``grid`` (a sample grid of the EMA
model)."""
