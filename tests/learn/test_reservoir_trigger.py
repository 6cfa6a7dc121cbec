import numpy as np
import pytest

from streamhash.learn.reservoir import Reservoir
from streamhash.learn.trigger import MIDriftDetector, MITrigger


def test_reservoir_is_uniform():
    n, k, trials = 40, 10, 4000
    counts = np.zeros(n)
    rng = np.random.default_rng(123)
    for t in range(trials):
        r = Reservoir(k, seed=int(rng.integers(1 << 31)))
        r.update_many(list(range(n)))
        assert len(r) == k and len(set(r.ids)) == k
        counts[r.ids] += 1
    expected = trials * k / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    # 39 degrees of freedom: the 0.999 quantile is about 72.1
    assert chi2 < 72.1, chi2
    # first and last items equally likely (position bias would show here)
    assert abs(counts[:10].mean() - counts[-10:].mean()) < 0.1 * expected


def test_reservoir_seeded_and_restorable():
    a, b = Reservoir(5, seed=7), Reservoir(5, seed=7)
    a.update_many(range(100), [i % 3 for i in range(100)])
    b.update_many(range(50), [i % 3 for i in range(50)])
    c = Reservoir.from_state_dict(b.state_dict())
    c.update_many(range(50, 100), [i % 3 for i in range(50, 100)])
    assert a.ids == c.ids and a.payloads == c.payloads and c.seen == 100


@pytest.mark.parametrize("threshold", [0.0, 0.05, -0.01])
def test_trigger_fires_iff_gain_exceeds_threshold(threshold):
    t = MITrigger(threshold)
    for live, cand in [(0.3, 0.3), (0.3, 0.3 + threshold), (0.3, 0.36), (0.3, 0.2), (0.5, 0.5 + threshold + 1e-9)]:
        d = t.update(live, cand)
        assert d.fire == ((cand - live) > threshold)
        assert d.gain == pytest.approx(cand - live)


def test_drift_arms_the_trigger():
    t = MITrigger(0.0, require_drift=True)
    assert not t.update(0.5, 0.9).fire  # not armed yet
    fired = []
    for i in range(300):
        live = 0.5 if i < 150 else 0.1  # the live quality collapses -> ADWIN flags it
        fired.append(t.update(live, live + 0.01).fire)
    assert any(fired[150:]) and not any(fired[:150])
    assert t.fired == 1  # the arming is used up by one re-encode


def test_drift_detector_river_api():
    d = MIDriftDetector()
    flags = [d.update(x).drift_detected for x in [0.5] * 200 + [0.0] * 200]
    assert any(flags[200:]) and not any(flags[:200])
