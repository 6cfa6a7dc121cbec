"""Evaluation: retrieval metrics, LSH baseline, Fashion-MNIST incremental/online protocols, reports.

Kept import-light (no torch here): ``streamhash --help`` builds the eval sub-command from it.
"""

DEFAULT_METHODS = ("streamhash", "selective_every_round", "full_every_round", "never_reencode", "full_retrain", "lsh")
# named only: full_retrain_same_labels holds out of training the labeled items the learner held out
METHODS = DEFAULT_METHODS + ("full_retrain_same_labels",)
