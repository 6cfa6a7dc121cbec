"""Evaluation: retrieval metrics, LSH baseline, Fashion-MNIST incremental/online protocols, reports.

Kept import-light (no torch here): ``streamhash --help`` builds the eval sub-command from it.
"""

METHODS = ("streamhash", "dihn_no_reencode", "reencode_every_round", "full_retrain", "frozen", "lsh")
