"""When to re-encode the stored codes: MI gain test plus an optional drift detector (river-style API).

After each learning round the caller runs the MIHash comparison (:func:`streamhash.learn.mi.mi_gain`)
on a reservoir of labeled items: queries encoded by the new network against the reservoir's codes as
the index holds them (*live*) and as the selective re-encode would leave them (*candidate*). It passes
the two MI values, the bootstrap standard deviation ``sigma`` of their difference and the re-encode's
cost. :class:`MITrigger` fires iff ``gain > threshold + sigmas * sigma`` (``sigmas`` = 2 by default)
and the cost is not 0 (nothing to re-encode: every stored code is learned): the gain must clear the
noise of its own estimate; ``threshold`` (0 by default) is a margin on top, and
a negative one lowers the bar (below any possible gain: always re-encode). With ``sigma`` left at 0
this is the plain ``gain > threshold`` test.

With ``require_drift=True`` the gain test only runs once a river ``ADWIN`` detector fed with the live
index's MI has flagged a change ("drift arms the trigger"); the arming lasts until a re-encode fires.
Without it (default) the detector still runs and its state is reported, but does not gate.

>>> t = MITrigger(threshold=0.01)
>>> t.update(live=0.50, candidate=0.505).fire, t.update(live=0.50, candidate=0.52).fire
(False, True)
>>> t.update(live=0.50, candidate=0.52, sigma=0.01).fire   # 0.02 < 0.01 + 2 * 0.01: within the noise
False
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
    sigma: float = 0.0  # standard deviation of the gain estimate (bootstrap over the reservoir items)
    bound: float = 0.0  # what the gain had to exceed: threshold + sigmas * sigma
    cost: int = 0  # estimated re-encode cost: stale inferred codes, i.e. images to decode and encode


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
    def __init__(self, threshold: float = 0.0, *, require_drift: bool = False, detector: MIDriftDetector | None = None,
                 sigmas: float = 2.0):
        self.threshold = float(threshold)
        self.sigmas = float(sigmas)
        self.require_drift = require_drift
        self.detector = detector or MIDriftDetector()
        self.armed = not require_drift
        self.fired = 0
        self.last: TriggerDecision | None = None

    def update(self, live: float, candidate: float, sigma: float = 0.0, cost: int | None = None) -> TriggerDecision:
        """Feed one round's (live, candidate) MI, the gain's standard deviation and the re-encode cost
        (None: unknown); returns the decision (``.fire`` = re-encode now). The drift detector sees the live MI."""
        self.detector.update(live)
        drifted = self.detector.drift_detected
        if drifted:
            self.armed = True
        gain = float(candidate) - float(live)
        armed = self.armed
        bound = self.threshold + self.sigmas * float(sigma)
        fire = armed and gain > bound and cost != 0
        if fire:
            self.fired += 1
            if self.require_drift:
                self.armed = False
        self.last = TriggerDecision(float(live), float(candidate), gain, self.threshold, drifted, armed, fire,
                                    float(sigma), bound, int(cost or 0))
        return self.last

    @property
    def drift_detected(self) -> bool:
        return self.detector.drift_detected
