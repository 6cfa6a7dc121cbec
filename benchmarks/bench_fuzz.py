"""Fuzzing at volume: the properties of tests/fuzz/ on 100,000 generated inputs, counted instead of asserted.

    python benchmarks/bench_fuzz.py [--records 50000] [--decode 25000] [--http 25000]
    python benchmarks/bench_fuzz.py --internal [--models 2000] [--codes 8000] [--json]

Targets (strategies in tests/fuzz/strategies.py):
- ``records``: Kafka records (keys, headers, labels, valid/mutated/random values) through ``parse_message``;
- ``decode``: valid PNG/JPEG/.npy bytes after bit flips, truncations, splices and width/height/shape edits,
  through ``decode_image`` with their own content type (what the learner and the query server call);
- ``http``: /search (JSON, multipart, raw bodies) and /items requests against the query app in-process,
  over a real LMDB store with a model and 8 items.

``--internal`` runs the internal topics' campaign instead (benchmarks/fuzz_internal.py): forged models-topic and
codes-topic records against a live worker, learner and query server, with ``crashes``, ``ingest_stalled`` and every
forged record accounted for.

Prints one JSON line: inputs and outcomes per target (indexed / rejected by stage; HTTP status), exceptions
other than RecordRejected (must be 0), 5xx responses (must be 0), and seconds. Exit status 1 if either is not 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from tests.fuzz.strategies import FUZZ, messages, mutated, requests, valid_images  # noqa: E402
from tests.fuzz.targets import decode_outcome, http_status, parse_outcome  # noqa: E402
from tests.services.test_query_server import serving  # noqa: E402


def run(strategy, examples: int, outcome) -> tuple[Counter, float]:
    """Draw ``examples`` inputs from ``strategy`` and count ``outcome(input)``; an exception is counted by class."""
    counts: Counter = Counter()

    @settings(FUZZ, max_examples=examples, phases=[Phase.generate])  # no shrinking: nothing is raised
    @given(strategy)
    def body(example):
        try:
            counts[outcome(example)] += 1
        except Exception as exc:  # noqa: BLE001  (counted, and fails the run below)
            counts[f"exception_{type(exc).__name__}"] += 1

    t0 = time.perf_counter()
    body()
    return counts, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--decode", type=int, default=25_000)
    p.add_argument("--http", type=int, default=25_000)
    p.add_argument("--internal", action="store_true", help="the internal topics' campaign (fuzz_internal.py)")
    p.add_argument("--models", type=int, default=2_000, help="--internal: forged models-topic records")
    p.add_argument("--codes", type=int, default=8_000, help="--internal: forged codes-topic records")
    p.add_argument("--images", type=int, default=3_000, help="--internal: valid images streamed meanwhile")
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout (the default output too)")
    args = p.parse_args()
    if args.internal:
        return internal(args)
    # Edited sizes between PIL's two ceilings warn, then our own limit rejects them; python-multipart logs
    # each malformed body it is given. Both are counted as outcomes, not printed 100,000 times.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    logging.getLogger("python_multipart").setLevel(logging.ERROR)

    results = {}
    results["records"] = run(messages(), args.records, lambda msg: parse_outcome(*msg))
    typed_mutants = valid_images().flatmap(lambda typed: st.tuples(st.just(typed[0]), mutated(typed[1])))
    results["decode"] = run(typed_mutants, args.decode, lambda typed: decode_outcome(typed[1], typed[0]))
    with tempfile.TemporaryDirectory() as tmp, serving(Path(tmp)) as (client, _):
        results["http"] = run(requests(), args.http, lambda req: str(http_status(client, req)))

    exceptions = sum(n for counts, _ in results.values() for name, n in counts.items() if name.startswith("exception_"))
    server_errors = sum(n for name, n in results["http"][0].items() if name.isdigit() and int(name) >= 500)
    print(json.dumps({
        "inputs": {name: sum(counts.values()) for name, (counts, _) in results.items()},
        "total_inputs": sum(sum(counts.values()) for counts, _ in results.values()),
        "outcomes": {name: dict(sorted(counts.items())) for name, (counts, _) in results.items()},
        "other_exceptions": exceptions,
        "http_5xx": server_errors,
        "seconds": {name: round(seconds, 1) for name, (_, seconds) in results.items()},
    }))
    return 1 if exceptions or server_errors else 0


def internal(args) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_faults
    from fuzz_internal import campaign

    from streamhash.kafka.broker import EmbeddedBroker

    work = Path(tempfile.mkdtemp(prefix="streamhash-fuzz-internal-"))
    broker = EmbeddedBroker(home=work / "broker").start()
    t0 = time.perf_counter()
    try:
        out = campaign(broker, work, models=args.models, codes=args.codes, images=args.images)
    finally:
        while bench_faults.SPAWNED:
            bench_faults.stop(bench_faults.SPAWNED.pop(), 10)
        broker.stop()
    print(json.dumps({"bench": "fuzz_internal", **out, "seconds": round(time.perf_counter() - t0, 1), "workdir": str(work)}))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
