"""Benchmark data sets for demos, tests and ``bench/`` (the ``datasets`` extra).

Nothing on the gateway path imports this package; it may depend on ``bibmon`` and
``pandas``. :mod:`fedgate_agent.datasets.tep` turns the Tennessee Eastman process
benchmark into non-IID per-site training files and a held-out test set.
"""
