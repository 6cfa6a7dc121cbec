"""The int64 multimap the index and the learner keep their id maps in."""

from __future__ import annotations

import numpy as np
import pytest

from streamhash.hashmap import Int64Multimap


def test_int64_multimap_matches_a_dict_of_lists():
    """Adds (repeated keys), removals and value remaps, across several folds of the small run into
    the large one (> 4096 pairs), against a plain Python model."""
    rng = np.random.default_rng(11)
    mm, model, next_v = Int64Multimap(), {}, 0
    for step in range(40):
        keys = rng.integers(-300, 300, int(rng.integers(1, 400)))
        vals = np.arange(next_v, next_v + len(keys))
        next_v += len(keys)
        mm.add(keys, vals)
        for k, v in zip(keys.tolist(), vals.tolist()):
            model.setdefault(k, set()).add(v)
        if step % 4 == 1:  # remove some present pairs and some absent ones
            pairs = [(k, v) for k, vs in model.items() for v in vs]
            pick = rng.choice(len(pairs), size=min(len(pairs), 150), replace=False)
            rk = np.array([pairs[i][0] for i in pick] + [5000], np.int64)
            rv = np.array([pairs[i][1] for i in pick] + [1], np.int64)
            assert mm.remove(rk, rv) == len(pick)
            for i in pick:
                model[pairs[i][0]].discard(pairs[i][1])
        if step == 30:  # a compaction-like renumbering of the values
            new_of_old = rng.permutation(next_v)
            mm.remap_values(new_of_old)
            model = {k: {int(new_of_old[v]) for v in vs} for k, vs in model.items()}
        probe = np.unique(rng.integers(-310, 310, 200))
        which, vals = mm.find(probe)
        got = {}
        for w, v in zip(which.tolist(), vals.tolist()):
            got.setdefault(int(probe[w]), []).append(v)
        for k in set(probe.tolist()):
            assert sorted(got.get(k, [])) == sorted(model.get(k, ())), (step, k)
        assert len(mm) == sum(len(vs) for vs in model.values())
    with pytest.raises(ValueError):
        mm.add(np.array([1]), np.array([-1]))
