"""The training wing: the reference pass, the pair filter, one training step, checkpoints, the
trainer and sweeps. Imports only :mod:`dpo_lib.core`."""
