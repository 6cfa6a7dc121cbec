"""When to re-encode the stored codes: MI gain test plus an optional drift detector (river-style API).

After each learning round the caller measures the MI quality of the reservoir under the *live* codes
(what the index holds) and under the *candidate* codes (the new network's encodings of the same
images). :class:`MITrigger` fires iff ``Q(candidate) - Q(live) > threshold``.

With ``require_drift=True`` the gain test only runs once a river ``ADWIN`` detector fed with the live
index's MI has flagged a change ("drift arms the trigger"); the arming lasts until a re-encode fires.
Without it (default) the detector still runs and its state is reported, but does not gate.

>>> t = MITrigger(threshold=0.01)
>>> t.update(live=0.50, candidate=0.505).fire, t.update(live=0.50, candidate=0.52).fire
(False, True)
"""

from __future__ import annotations

from dataclasses import dataclass

from river import drift


@dataclass(frozen=True)
class TriggerDecision:
    live: float
    candidate: float
    gain: float
    threshold: float
    drift: bool  # the detector flagged a change on this update
    armed: bool  # the gain test was allowed to fire on this update
    fire: bool   # re-encode now


class MIDriftDetector:
    """Thin wrapper over ``river.drift.ADWIN`` fed with the live MI; ``update(x)`` + ``drift_detected``."""

    def __init__(self, delta: float = 0.002, **kwargs):
        self._adwin = drift.ADWIN(delta=delta, **kwargs)

    def update(self, x: float) -> "MIDriftDetector":
        self._adwin.update(float(x))
        return self

    @property
    def drift_detected(self) -> bool:
        return bool(self._adwin.drift_detected)


class MITrigger:
    def __init__(self, threshold: float = 0.0, *, require_drift: bool = False, detector: MIDriftDetector | None = None):
        self.threshold = float(threshold)
        self.require_drift = require_drift
        self.detector = detector or MIDriftDetector()
        self.armed = not require_drift
        self.fired = 0
        self.last: TriggerDecision | None = None

    def update(self, live: float, candidate: float) -> TriggerDecision:
        """Feed one round's (live, candidate) MI; returns the decision (``.fire`` = re-encode now)."""
        self.detector.update(live)
        drifted = self.detector.drift_detected
        if drifted:
            self.armed = True
        gain = float(candidate) - float(live)
        armed = self.armed
        fire = armed and gain > self.threshold
        if fire:
            self.fired += 1
            if self.require_drift:
                self.armed = False
        self.last = TriggerDecision(float(live), float(candidate), gain, self.threshold, drifted, armed, fire)
        return self.last

    @property
    def drift_detected(self) -> bool:
        return self.detector.drift_detected
