"""Evaluation: retrieval metrics, LSH baseline, Fashion-MNIST incremental/online protocols, reports.

Kept import-light (no torch here): ``streamhash --help`` builds the eval sub-command from it.
"""

METHODS = ("streamhash", "selective_every_round", "full_every_round", "never_reencode", "full_retrain", "lsh")
