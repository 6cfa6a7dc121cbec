"""What the demo prints, without running it: progress lines while it waits, a summary whose every number says
what it counts and that names no URL of a process already stopped, and the stream it sends."""

from __future__ import annotations

import re
import time

import numpy as np

from streamhash.services import demo

SUMMARY = {
    "produced": 10000, "labeled": 7500, "unlabeled": 2500, "late_class": 9, "malformed_sent": 8, "indexed": 10000,
    "dead_lettered": 8, "index_size": 10050, "bits": 32, "ingest_images_per_s": 5031.6, "freshness_p50_s": 0.018,
    "freshness_p99_s": 0.027, "freshness_probes": 50, "freshness_probes_sent": 50, "query_p50_ms": 1.9,
    "query_p99_ms": 5.4, "query_learned_p50_ms": 2.0, "query_learned_p99_ms": 7.0, "queries": 200,
    "precision_at_10": 0.83, "precision_at_10_indexed": 0.37, "model_version_indexed": 1, "model_version": 3,
    "generation": 1, "learning_rounds": 2, "reencodes": 0, "reencode_triggers": 0, "learning_complete": True,
    "learned_codes": 7550, "learned_codes_expected": 7550, "learn_budget_s": 120.0, "running": False,
    "index_mi": 0.26, "candidate_mi": 0.28,
}


def test_progress_repeats_what_it_waits_for_while_nothing_else_is_said(capsys, monkeypatch):
    monkeypatch.setattr(demo, "PROGRESS_EVERY_S", 0.3)
    progress = demo.Progress(quiet=False).start()
    progress.say("waiting for the worker", force=True)
    time.sleep(1.5)  # a call that says nothing, as a process starting
    progress.stop()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and all(line.endswith("waiting for the worker") for line in lines)
    assert all(re.match(r"\[\s*\d+ s\] ", line) for line in lines)


def test_progress_says_nothing_when_quiet(capsys):
    progress = demo.Progress(quiet=True).start()
    progress.say("x", force=True)
    progress.stop()
    assert capsys.readouterr().out == ""


def test_the_summary_explains_each_number_and_names_no_dead_url(capsys):
    demo.print_summary(SUMMARY)
    out = capsys.readouterr().out
    assert "the query index holds 10050: 10000 images + 50 freshness probes" in out
    assert "the 8 malformed messages, one per way to break the contract" in out
    assert "7500 labeled, 2500 sent unlabeled" in out and 'class 9 "Ankle boot" streamed last' in out
    assert "0.37 with model v1 (untrained) -> 0.83 with model v3" in out
    assert "every labeled item learned (7550 codes published)" in out and "0  MI-triggered re-encodes" in out
    assert "http://" not in out and "run `streamhash demo --serve` to keep them" in out


def test_the_summary_counts_old_codes_re_learned_apart(capsys):
    demo.print_summary({**SUMMARY, "learned_codes": 9537})
    assert "9537 codes published, 1987 of them old codes re-learned when a new label arrived" in capsys.readouterr().out


def test_the_summary_of_a_running_demo_names_its_urls(capsys):
    demo.print_summary({**SUMMARY, "running": True, "metrics_urls": ["http://127.0.0.1:1/metrics"],
                        "search_url": "http://127.0.0.1:2/search", "docs_url": "http://127.0.0.1:2/docs"})
    out = capsys.readouterr().out
    assert "http://127.0.0.1:1/metrics" in out and "POST http://127.0.0.1:2/search" in out and "--serve" not in out


def test_the_summary_says_when_the_learning_budget_ran_out(capsys):
    demo.print_summary({**SUMMARY, "learning_complete": False, "learned_codes": 2207, "model_version": 2})
    assert "2207 of 7550 labeled items learned when the demo's 120 s learning budget ran out" in capsys.readouterr().out


def test_the_stream_holds_a_quarter_unlabeled_and_the_late_class_last():
    labels = np.random.default_rng(1).integers(0, 10, 60_000)
    order, unlabeled = demo.stream_order(labels, seed=0, limit=10_000)
    assert len(order) == len(set(order.tolist())) == 10_000
    late = labels[order] == demo.LATE_CLASS
    assert late.any() and not late[: -late.sum()].any()  # every image of the late class after all the others
    assert 0.22 < unlabeled.mean() < 0.28


def test_the_summary_says_when_and_why_the_trigger_fired_and_what_it_re_encoded(capsys, tmp_path):
    log = tmp_path / "learner.log"
    log.write_text(
        "round 1: 2006 codes learned (1990 changed), MI live 0.2825 candidate 0.3019 gain +0.0193 (bound 0.0060, "
        "sigma 0.0030, 41 reservoir codes would change) -> re-encode (cost: ~8044 stale inferred codes)\n"
        "round 2: 2000 codes learned (7 changed), MI live 0.3 candidate 0.3 gain -0.0010 (bound 0.0040, "
        "sigma 0.0020, 3 reservoir codes would change) -> keep codes (cost: ~8044 stale inferred codes)\n")
    triggers = demo.summary.triggers_in(log)
    assert triggers == [{"round": 1, "codes_learned": 2006, "gain": 0.0193, "bound": 0.006}]
    assert demo.summary.triggers_in(tmp_path / "absent.log") == []
    demo.print_summary({**SUMMARY, "reencode_triggers": 1, "generation": 2, "triggers": triggers, "reencoded_images": 8241})
    out = capsys.readouterr().out
    assert "1  MI-triggered re-encodes" in out and "8241 images re-encoded by the worker" in out
    assert "fired at round 1: gain +0.0193 > bound 0.0060" in out
