"""The demo's summary: the numbers one run measured (:func:`summarize`, also ``--json``'s object) and the
words for each (:func:`print_summary`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamhash.data.fashion_mnist import CLASSES
from streamhash.services.demo.measure import percentile_ms


@dataclass
class Ingest:
    """The bulk load: images sent, what the worker reported, and when the first was sent and the last committed."""
    produced: int
    indexed: float
    dead: float
    t0: float
    t_indexed: float
    truth: dict[str, int]  # each stored id's true class, sent unlabeled or not (the probes' too, once sent)


@dataclass
class Searches:
    """Precision@10 and latencies of the held-out searches: once indexed, and once learned (if a learner ran)."""
    p10_indexed: float
    latencies: list[float]
    version_indexed: int
    p10: float
    latencies_learned: list[float]
    learning: dict


# the learner's line for each round's MI test (services/learner/app.py Learner.report)
_ROUND = re.compile(r"round (\d+): (\d+) codes learned .*? gain ([+-]?[\d.]+) \(bound ([\d.]+).*?-> (re-encode|keep codes)")


def triggers_in(learner_log: Path) -> list[dict]:
    """The rounds whose MI test fired, from the learner's log: when (round), why (gain against its bound)."""
    try:
        text = learner_log.read_text(errors="replace")
    except OSError:
        return []
    return [{"round": int(r), "codes_learned": int(n), "gain": float(g), "bound": float(b)}
            for r, n, g, b, what in _ROUND.findall(text) if what == "re-encode"]


def summarize(ingest: Ingest, delays: list[float], searches: Searches, health: dict, lm: dict, *, labeled: int,
              late_class: int, malformed: int, bits: int, probes: int, learned_expected: int, learn_budget_s: float,
              keep_running: bool, triggers: list[dict] = (), reencoded_images: float = 0.0) -> dict:
    """One demo run in numbers, each key saying what it counts (``health``: the query server's ``/healthz``
    at the end; ``lm``: the learner's metrics then, empty without a learner; ``triggers``: :func:`triggers_in`;
    ``reencoded_images``: what the worker re-encoded)."""
    produced, s, learning = ingest.produced, searches, searches.learning
    return {
        "produced": produced, "labeled": labeled, "unlabeled": produced - labeled, "late_class": late_class,
        "malformed_sent": malformed, "indexed": int(ingest.indexed), "dead_lettered": int(ingest.dead),
        "index_size": health["index_size"], "bits": bits,
        "ingest_images_per_s": round(produced / (ingest.t_indexed - ingest.t0), 1),
        "freshness_p50_s": round(float(np.percentile(delays, 50)), 3) if delays else None,
        "freshness_p99_s": round(float(np.percentile(delays, 99)), 3) if delays else None,
        "freshness_probes": len(delays), "freshness_probes_sent": probes,
        "query_p50_ms": percentile_ms(s.latencies, 50), "query_p99_ms": percentile_ms(s.latencies, 99),
        "query_learned_p50_ms": percentile_ms(s.latencies_learned, 50),
        "query_learned_p99_ms": percentile_ms(s.latencies_learned, 99),
        "queries": len(s.latencies), "precision_at_10": round(s.p10, 4),
        "precision_at_10_indexed": round(s.p10_indexed, 4), "model_version_indexed": s.version_indexed,
        "model_version": health["model_version"], "generation": health["generation"],
        "learning_rounds": int(lm.get("streamhash_learning_rounds_total", 0)),
        "reencodes": int(lm.get("streamhash_reencode_triggers_total", 0)),
        "reencode_triggers": int(lm.get("streamhash_reencode_triggers_total", 0)),
        "learning_complete": learning["complete"], "learned_codes": learning["codes"],
        "learned_codes_expected": learned_expected, "learn_budget_s": learn_budget_s,
        "learner_cpu_s": round(lm.get("process_cpu_seconds_total", 0.0), 1),
        "running": keep_running,
        "index_mi": round(lm.get("streamhash_index_mi", 0.0), 4),
        "candidate_mi": round(lm.get("streamhash_candidate_mi", 0.0), 4),
        "triggers": list(triggers), "reencoded_images": int(reencoded_images),
    }


def _reencodes(s: dict) -> str:
    head = f"{s['reencode_triggers']}  MI-triggered re-encodes of the stale inferred codes (generation {s['generation']})"
    fired = "; ".join(f"round {t['round']}: gain {t['gain']:+.4f} > bound {t['bound']:.4f}" for t in s.get("triggers", []))
    if not s["reencode_triggers"]:
        return f"{head}; the last round's MI test: live codes {s['index_mi']}, candidate codes {s['candidate_mi']}"
    return f"{head}, {s.get('reencoded_images', 0)} images re-encoded by the worker" + (f"; fired at {fired}" if fired else "")


def _latency(s: dict) -> str:
    first = f"p50 {s['query_p50_ms']} ms, p99 {s['query_p99_ms']} ms"
    if s.get("query_learned_p50_ms") is None:
        return first
    return f"{first} beside the learner; p50 {s['query_learned_p50_ms']} ms, p99 {s['query_learned_p99_ms']} ms once learned"


def _learning(s: dict) -> str:
    rounds, v0, v = s["learning_rounds"], s["model_version_indexed"], s["model_version"]
    again = s["learned_codes"] - s["learned_codes_expected"]  # a round that brought a new label re-learned old codes
    done = (f"every labeled item learned ({s['learned_codes']} codes published"
            f"{f', {again} of them old codes re-learned when a new label arrived' if again > 0 else ''})"
            if s["learning_complete"] else
            f"{s['learned_codes']} of {s['learned_codes_expected']} labeled items learned when the demo's "
            f"{s['learn_budget_s']:.0f} s learning budget ran out (a busy machine; --serve lets it finish)")
    return (f"{rounds} DIHN round(s) in the learner process, each publishing the next model version (v{v0} -> v{v}); "
            f"{done}")


def print_summary(s: dict) -> None:
    """Every number with the phrase that says what it counts."""
    late = s.get("late_class_name") or (CLASSES[s["late_class"]] if s.get("late_class") is not None else None)
    data = s.get("dataset_title", "Fashion-MNIST images")  # demo/photos.py: "CIFAR-10 photos"
    stream = (f"{s['produced']} {data} ({s['labeled']} labeled, {s['unlabeled']} sent unlabeled; "
              f"class {s['late_class']} \"{late}\" streamed last) + {s['malformed_sent']} malformed messages, "
              f"{s['bits']}-bit codes") if "labeled" in s else f"{s['produced']} {data}"
    probes = s["index_size"] - s["indexed"]
    print(f"""
streamhash demo: {stream}
  indexed            {s['indexed']}  every streamed image; the query index holds {s['index_size']}: {s['indexed']} images + {probes} freshness probes
  dead-lettered      {s['dead_lettered']}  the {s['malformed_sent']} malformed messages, one per way to break the contract (`streamhash dlq` lists them, with why)
  ingest rate        {s['ingest_images_per_s']} images/s  from the first send to the last item committed, the learner training beside
  freshness          p50 {s['freshness_p50_s']} s, p99 {s['freshness_p99_s']} s  from send to searchable, over {s['freshness_probes']} of {s['freshness_probes_sent']} single probe images
  query latency      {_latency(s)}
                     ({s['queries']} searches by PNG image each, k=10, timed at an httpx client)
  precision@10       {s['precision_at_10_indexed']} with model v{s['model_version_indexed']}{' (untrained)' if s['model_version_indexed'] <= 1 else ''} -> {s['precision_at_10']} with model v{s['model_version']}
                     (share of the 10 hits of a held-out test image's own class; random ranking gives ~0.1)
  learning           {_learning(s)}
  re-encodes         {_reencodes(s)}""")
    if s.get("running"):
        print(f"""  metrics            {'  '.join(s['metrics_urls'])}
  search             POST {s['search_url']}   (API docs: {s['docs_url']})""")
    else:
        print("  processes          stopped with the demo: run `streamhash demo --serve` to keep them (search page, /docs, /metrics)")
