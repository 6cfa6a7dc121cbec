"""Models: versioned, one of them current."""

from streamhash.index.store import Store


def test_models_are_versioned(tmp_path):
    s = Store(tmp_path, bits=32)
    assert s.get_model() == (0, None)
    v1 = s.put_model(b"one", make_current=True)
    v2 = s.put_model(b"two")
    assert (v1, v2) == (1, 2)
    assert s.get_model() == (1, b"one") and s.get_model(2) == (2, b"two")
