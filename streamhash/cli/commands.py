"""``streamhash query``, ``delete`` and ``dlq``: a search on the query server, tombstones on the images topic,
and the dead-letter topic read, summed up or replayed."""

from __future__ import annotations

from streamhash.cli.common import CommandFailed, check_broker, read_file, settings_with_logging
from streamhash.errors import EXIT_DATAERR, EXIT_NOT_FOUND, EXIT_SOFTWARE, EXIT_UNAVAILABLE, EXIT_USAGE


def _http(method: str, url: str, base: str, **kw):
    """One request to the query server at ``base``; unreachable or timed out: CommandFailed, in words."""
    import httpx

    try:
        return httpx.request(method, url, timeout=30, **kw)
    except httpx.ConnectError as exc:
        raise CommandFailed(f"cannot reach the query server at {base} ({_reason(exc)}): start it with "
                            "`streamhash serve`, or give --url", EXIT_UNAVAILABLE) from None
    except httpx.TimeoutException:
        raise CommandFailed(f"the query server at {base} did not answer within 30 s", EXIT_UNAVAILABLE) from None
    except httpx.UnsupportedProtocol:
        raise CommandFailed(f"bad --url {base!r}: expected http://host:port", EXIT_USAGE) from None
    except httpx.HTTPError as exc:
        raise CommandFailed(f"the query server at {base} broke off: {type(exc).__name__}: {exc}", EXIT_UNAVAILABLE) from None


def _reason(exc: Exception) -> str:
    text = str(exc)
    return "connection refused" if "refused" in text.lower() else text or type(exc).__name__


def _detail(r) -> str:
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = None
    detail = detail if isinstance(detail, str) else (str(detail) if detail is not None else r.text[:300])
    return " ".join(detail.split())  # one line


def query(args) -> int:
    import base64
    import json

    body: dict = {"k": args.k}
    if args.radius is not None:
        body["radius"] = args.radius
    if args.code:
        body["code_hex"] = args.code
    else:
        body["image_base64"] = base64.b64encode(read_file(args.image, "image")).decode()
    base = args.url.rstrip("/")
    r = _http("POST", f"{base}/search", base, json=body)
    if 400 <= r.status_code < 500:
        what = f"image {args.image}" if not args.code else f"code {args.code}"
        raise CommandFailed(f"the server refused the {what} ({r.status_code}): {_detail(r)}", EXIT_DATAERR)
    if r.status_code != 200:
        raise CommandFailed(f"the query server failed ({r.status_code}): {_detail(r)} (its log says why)", EXIT_SOFTWARE)
    res = r.json()
    if args.json:
        print(json.dumps(res))
    else:
        print(f"model v{res['model_version']} generation {res['generation']}, {res.get('index_size', '?')} items  "
              f"({res['took_ms']:.2f} ms)")
        if res["model_version"] <= 1:
            print(f"note: {_untrained_note(base)}")
        for hit in res["results"]:
            names = hit.get("label_names")
            named = f"  ({', '.join(names)})" if names else ""
            print(f"  {hit['distance']:3d}  {hit['id']}  labels={hit['labels']}{named}")
    if not res["results"]:
        if args.radius is not None:
            raise CommandFailed(f"no item within radius {args.radius}", EXIT_NOT_FOUND)
        raise CommandFailed("no item: the index is empty", EXIT_NOT_FOUND)
    return 0


def _untrained_note(base: str) -> str:
    """The server's own words on what an untrained model waits for (its /status), or ours without it."""
    try:
        import httpx

        note = httpx.get(f"{base}/status", timeout=5).json()["model"]["note"]
        if note:
            return note
    except Exception:  # noqa: BLE001 -- an older server or a router has no such field: say it ourselves
        pass
    return ("the model is untrained (version 1, no learning round yet): hits are close to noise until the learner's "
            "first round, which waits for labeled items (STREAMHASH_LEARN__ROUND_EVERY of them)")


def delete(args) -> int:
    """Tombstones (a null value for each id) on the images topic: each worker removes the item from its shard."""
    from streamhash.kafka.produce import make_producer

    settings = settings_with_logging(args)
    bad = [i for i in args.ids if not 1 <= len(i.encode()) <= 256]
    if bad:
        raise CommandFailed(f"an item id is 1..256 bytes of UTF-8, got {bad[0]!r}", EXIT_USAGE)
    check_broker(settings)
    producer = make_producer(settings.kafka)
    try:
        for fut in [producer.send(settings.kafka.topic, key=i.encode(), value=None) for i in args.ids]:
            fut.get(timeout=settings.kafka.request_timeout_ms / 1000)
    except Exception as exc:  # noqa: BLE001 -- kafka-python raises KafkaTimeoutError, NoBrokersAvailable, ...
        raise CommandFailed(f"sending tombstones to {settings.kafka.topic} failed: {exc}", EXIT_UNAVAILABLE) from None
    finally:
        producer.close()
    print(f"sent {len(args.ids)} tombstone(s) to {settings.kafka.topic}: each item leaves its shard, the live index "
          f"and every search once its worker commits them")
    return 0


def dlq(args) -> int:
    import json

    from streamhash.kafka.dlq_reader import DeadLetterReader, NoDeadLetterTopic, replay, summarize

    settings = settings_with_logging(args)
    check_broker(settings)
    kafka = settings.kafka
    try:
        reader = DeadLetterReader(kafka)
    except NoDeadLetterTopic as exc:
        raise CommandFailed(str(exc), EXIT_NOT_FOUND) from None
    try:
        letters = [d for d in reader.read_to_end() if args.stage is None or d.stage == args.stage]
        if args.replay:
            from streamhash.kafka.produce import make_producer

            producer = make_producer(kafka)
            try:
                n = replay(producer, kafka.topic, letters)
            finally:
                producer.close()
            skipped = len(letters) - n
            print(f"replayed {n} dead letters to {kafka.topic}" + (f" ({skipped} skipped: their value was dropped "
                                                                   "for size)" if skipped else ""))
            return 0
        summary = summarize(letters)
        shown = letters[-args.last:] if args.last else []
        if args.json:
            print(json.dumps({"topic": kafka.dlq_topic, **summary, "letters": [d.as_dict() for d in shown]}), flush=True)
        else:
            print(f"{kafka.dlq_topic}: {summary['total']} dead letters (one per refused message)")
            if letters:
                print("  by stage:  " + ", ".join(f"{k} {v}" for k, v in summary["by_stage"].items()))
                print("  by class:  " + ", ".join(f"{k} {v}" for k, v in summary["by_class"].items()))
                print(f"last {len(shown)}:")
            for d in shown:
                print(_letter_line(d))
        if args.follow:
            for d in reader.follow():
                if args.stage is None or d.stage == args.stage:
                    print(json.dumps(d.as_dict()) if args.json else _letter_line(d), flush=True)
    finally:
        reader.close()
    return 0




def _letter_line(d) -> str:
    topic, part, off = d.source
    key = "(no key)" if d.key is None else d.as_dict()["key"]
    key = key if len(key) <= 60 else key[:57] + "..."
    return f"  {key}  {d.stage}  {d.error_class}: {' '.join(d.reason.split())}  [{topic} partition {part} offset {off}]"

