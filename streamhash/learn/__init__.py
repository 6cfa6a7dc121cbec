"""Incremental learning: DIHN learner, MI quality and re-encode trigger, reservoir sampling."""

from streamhash.learn.base import IncrementalHasher, RoundResult
from streamhash.learn.dihn import DIHNLearner, dcc_update
from streamhash.learn.mi import mi_per_anchor, mi_quality
from streamhash.learn.online import OnlineHasher, RoundReport
from streamhash.learn.reservoir import Reservoir
from streamhash.learn.trigger import MIDriftDetector, MITrigger, TriggerDecision

__all__ = ["IncrementalHasher", "DIHNLearner", "RoundResult", "dcc_update", "mi_per_anchor", "mi_quality", "OnlineHasher",
           "RoundReport", "Reservoir", "MIDriftDetector", "MITrigger", "TriggerDecision"]
