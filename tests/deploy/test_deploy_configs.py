"""The deploy/ folder stays valid and in step with the code.

- ``promtool`` validates the Prometheus config and alert rules and runs the rule unit tests
  (deploy/prometheus/alerts_test.yml); every PromQL query of the Grafana dashboard is checked by
  the same parser.
- Every ``streamhash_*`` metric named in the alerts, their tests, the dashboard and the README
  exists in streamhash/metrics.py (read from the live prometheus_client registry), so renaming a
  metric in code without updating the dashboards fails here.
- compose.yaml: services (N scalable workers over one shared store root, one learner, a query
  server, a router in front), mounted files, and every ``STREAMHASH_*`` variable maps onto a real
  field of streamhash.config.Settings and validates; Prometheus scrapes each kind of process
  (the workers by DNS service discovery), and the alerts and dashboard cover shards and processes.
- A real ``prometheus`` process scrapes streamhash's metrics from this test process and answers
  the query API with the value we incremented, with our alert rules loaded and healthy.

promtool/prometheus come from the Debian package ``prometheus`` (``apt-get install -y prometheus``);
tests needing them skip with that reason when they are not on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
COMPOSE = DEPLOY / "compose.yaml"
README = DEPLOY / "README.md"
SCALING = ROOT / "docs" / "SCALING.md"
# The job names the alerts and the dashboard select on, one per kind of process.
JOBS = {"worker": "streamhash-worker", "learner": "streamhash-learner", "query": "streamhash-query",
        "router": "streamhash-router"}

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
_INSTALL_HINT = "(Debian: apt-get install -y prometheus)"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not on PATH {_INSTALL_HINT}")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus binary not on PATH {_INSTALL_HINT}")

_METRIC_REF = re.compile(r"(?<![A-Za-z0-9_])streamhash_[a-z0-9_]*[a-z0-9]")


# --------------------------------------------------------------------------------------------
# helpers


def _promtool(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    proc = subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def exposed_metric_names() -> set[str]:
    """Every series name streamhash.metrics can expose, with the suffixes the exposition adds."""
    from streamhash.metrics import REGISTRIES

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "gauge": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "stateset": ("",),
        "enum": ("",),
    }
    names: set[str] = set()
    for family in (f for registry in REGISTRIES.values() for f in registry.collect()):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        if family.type in ("histogram", "summary"):
            names.add(family.name)  # prose names a histogram by its family name
        names.update(sample.name for sample in family.samples)  # what is exposed right now
    return {n for n in names if n.startswith("streamhash_")}


def dashboard_exprs(path: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL expr) for every query in a Grafana dashboard, rows included."""
    out: list[tuple[str, str]] = []

    def walk(panels: list) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(json.loads(path.read_text())["panels"])
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


# --------------------------------------------------------------------------------------------
# promtool


@needs_promtool
def test_promtool_check_config():
    _promtool("check", "config", PROM_CONFIG)


@needs_promtool
def test_promtool_check_rules():
    out = _promtool("check", "rules", ALERTS).stdout
    assert "SUCCESS" in out


@needs_promtool
def test_promtool_rule_unit_tests():
    _promtool("test", "rules", ALERTS_TEST)


def test_alert_rule_unit_tests_cover_firing_and_quiet_cases():
    """At least 3 alerts are tested both firing and not firing (a guard on alerts_test.yml itself)."""
    text = ALERTS_TEST.read_text()
    # Split the test file into alertname -> list of expectations (empty or not).
    fired: dict[str, set[bool]] = {}
    for m in re.finditer(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:\s*(\[\])?", text):
        fired.setdefault(m.group(1), set()).add(m.group(2) is None)
    both = sorted(a for a, s in fired.items() if s == {True, False})
    assert len(both) >= 3, f"alerts tested both firing and quiet: {both}"
    defined = set(re.findall(r"^\s*- alert:\s*(\S+)", ALERTS.read_text(), flags=re.M))
    assert set(fired) <= defined, f"tests name alerts that do not exist: {set(fired) - defined}"


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool has no expression checker, so wrap each dashboard query in a recording rule."""
    rules = []
    for dash in DASHBOARDS:
        for i, (title, expr) in enumerate(dashboard_exprs(dash)):
            # Grafana's interval variables are not PromQL; give them a concrete value.
            expr = re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
            rules.append({"record": f"dashboard:{dash.stem.replace('-', '_')}:{i}", "expr": expr})
    assert rules, "the dashboard has no queries"
    rules_file = tmp_path / "dashboard_rules.yml"
    # JSON is YAML: no PyYAML needed to write the file.
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=1))
    _promtool("check", "rules", rules_file)


# --------------------------------------------------------------------------------------------
# metric names: code <-> alerts / dashboard / README


def test_metric_names_in_deploy_files_exist_in_code():
    names = exposed_metric_names()
    assert "streamhash_messages_consumed_total" in names  # sanity check of the name listing
    assert "streamhash_query_duration_seconds_bucket" in names
    assert "streamhash_build_info" in names

    sources = {p: p.read_text() for p in (ALERTS, ALERTS_TEST, README, PROM_CONFIG, SCALING, *DASHBOARDS) if p.exists()}
    assert ALERTS in sources and DASHBOARDS, "deploy/prometheus/alerts.yml or the Grafana dashboard is missing"
    unknown = {
        f"{path.relative_to(ROOT)}: {ref}"
        for path, text in sources.items()
        for ref in _METRIC_REF.findall(text)
        if ref not in names
    }
    assert not unknown, "metrics referenced in deploy/ but not defined in streamhash/metrics.py:\n" + "\n".join(
        sorted(unknown)
    )


def test_process_metrics_in_alerts_are_served_by_every_process():
    """Alerts on process_* series (the crash-loop alert on process_start_time_seconds) need the
    process collector in the registry each streamhash process serves, worker and query alike."""
    from streamhash import metrics

    refs = set(re.findall(r"(?<![A-Za-z0-9_])process_[a-z0-9_]*[a-z0-9]", ALERTS.read_text()))
    assert "process_start_time_seconds" in refs
    for kind, registry in metrics.REGISTRIES.items():
        served = {s.name for family in registry.collect() for s in family.samples}
        assert refs <= served, f"the {kind} registry does not serve {sorted(refs - served)}"


def test_dashboard_shows_the_required_metrics():
    exprs = " ".join(e for d in DASHBOARDS for _, e in dashboard_exprs(d))
    required = [
        "streamhash_messages_consumed_total",  # ingest rate
        "streamhash_messages_dead_lettered_total",  # DLQ rate by stage
        "streamhash_consumer_lag_messages",
        "streamhash_lmdb_commit_duration_seconds_bucket",
        "streamhash_encode_duration_seconds_bucket",
        "streamhash_query_duration_seconds_bucket",
        "streamhash_index_items",
        "streamhash_freshness_seconds_bucket",
        "streamhash_learning_rounds_total",
        "streamhash_index_mi",
        "streamhash_candidate_mi",
        "streamhash_reencode_triggers_total",
        "streamhash_drift_detections_total",
        "streamhash_model_version",
        "streamhash_index_generation",
        # the scale-out: shards, the learner, the router
        "streamhash_shard_items",
        "streamhash_shard_generation",
        "streamhash_shard_model_version",
        "streamhash_shards_open",
        "streamhash_assigned_partitions",
        "streamhash_code_updates_total",
        "streamhash_shard_reencodes_total",
        "streamhash_shard_lock_waits_total",
        "streamhash_learner_published_model_version",
        "streamhash_learner_published_generation",
        "streamhash_learned_codes_published_total",
        "streamhash_query_shards",
        "streamhash_router_shard_requests_total",
    ]
    missing = [m for m in required if m not in exprs]
    assert not missing, f"dashboard lacks panels for {missing}"
    assert "by (stage)" in exprs


def _panels(dash_path: Path) -> list[dict]:
    out, stack = [], list(json.loads(dash_path.read_text())["panels"])
    while stack:
        panel = stack.pop()
        out.append(panel)
        stack.extend(panel.get("panels", []))
    return out


def test_dashboard_has_per_shard_and_per_process_panels():
    """The scale-out dashboard: per-shard panels split by the `shard` label (its legend names the shard),
    per-process panels split by job and instance, and no query still grouping worker metrics by a
    `shard` *target* label (a worker owns several shards; prometheus.yml sets no such label)."""
    per_shard, per_process = [], []
    for dash in DASHBOARDS:
        for panel in _panels(dash):
            for t in panel.get("targets", []):
                expr, legend = t.get("expr", ""), t.get("legendFormat", "")
                if re.match(r"\w+ by \((shard|shard, instance)\) \(streamhash_shard_", expr):  # one series per shard
                    per_shard.append(panel["title"])
                    assert "{{shard}}" in legend or t.get("format") == "table", f"{panel['title']}: legend lacks the shard"
                if re.search(r"process_[a-z_]+\{job=~\"streamhash-\.\*\"\}", expr):
                    per_process.append(panel["title"])
                    assert "{{job}}" in legend and "{{instance}}" in legend, f"{panel['title']}: legend lacks job/instance"
    assert len(set(per_shard)) >= 4, f"per-shard panels: {sorted(set(per_shard))}"
    assert len(set(per_process)) >= 3, f"per-process panels: {sorted(set(per_process))}"
    for dash in DASHBOARDS:
        for title, expr in dashboard_exprs(dash):
            if re.search(r"by \([^)]*\bshard\b", expr):
                assert "streamhash_shard_" in expr or "streamhash_router_" in expr, (
                    f"{title}: groups {expr!r} by shard, which only the per-shard series carry")


def test_dashboard_structure_and_datasource():
    ds_uid = re.search(r"^\s*uid:\s*(\S+)", DATASOURCES.read_text(), flags=re.M).group(1)
    for dash_path in DASHBOARDS:
        dash = json.loads(dash_path.read_text())
        assert dash.get("uid") and dash.get("title")
        ids, stack = [], list(dash["panels"])
        while stack:
            panel = stack.pop()
            ids.append(panel["id"])
            stack.extend(panel.get("panels", []))
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == ds_uid, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == ds_uid, panel["title"]
            g = panel["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        assert len(ids) == len(set(ids)), f"duplicate panel ids in {dash_path.name}"


# --------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_copies_the_build_inputs():
    """A build file added to the repository (setup.py, ...) must reach the image build."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    copied = " ".join(re.findall(r"^COPY (?!--from)(.*)$", dockerfile, flags=re.M))
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "streamhash", "consumers"):
        if (ROOT / name).exists():
            assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", copied), f"deploy/Dockerfile does not COPY {name}"
            assert f"!{name}" in ignore, f"deploy/Dockerfile.dockerignore excludes {name}"
    # torch comes from the CPU index, pinned to the version the tests run against.
    assert "download.pytorch.org/whl/cpu" in dockerfile
    pinned = re.search(r"ARG TORCH_VERSION=(\S+)", dockerfile).group(1)
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("torch").split("+")[0]
    except PackageNotFoundError:
        pytest.skip("torch not installed: cannot compare with the Dockerfile pin")
    assert pinned == installed, f"Dockerfile pins torch {pinned}, tests run torch {installed}"


# --------------------------------------------------------------------------------------------
# compose.yaml


@pytest.fixture(scope="module")
def compose():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: compose.yaml not parsed")
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def prom_config():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: prometheus.yml not parsed")
    return yaml.safe_load(PROM_CONFIG.read_text())


def _volumes(svc: dict) -> dict[str, str]:
    """source -> target of a service's volumes (short syntax)."""
    return {v.split(":")[0]: v.split(":")[1] for v in svc.get("volumes", [])}


def _machines(compose) -> list[tuple[str, str]]:
    """(worker, query server) service names of each machine: worker-x beside query-x."""
    services = compose["services"]
    return [(name, "query-" + name.removeprefix("worker-")) for name, svc in sorted(services.items())
            if svc.get("command") == ["streamhash-worker"]]


def _kafka_topics(compose) -> dict[str, str]:
    """topic -> its kafka-topics.sh --create command line, from kafka-init."""
    script = "\n".join(compose["services"]["kafka-init"]["command"]).replace("\\\n", " ")
    return {m.group(1): line for line in script.splitlines() if "--create" in line
            for m in [re.search(r"--topic (\S+)", line)] if m}


def test_compose_services_run_the_package_s_entry_points_and_listen_beyond_loopback(compose):
    """Every service built from the repository runs a console script of the package (pyproject's
    [project.scripts]) with arguments its parser accepts; every port another container reaches (a scrape
    target, a router's remote) is bound beyond loopback; the broker is KRaft, created topics before use."""
    import importlib
    import tomllib

    from streamhash.cli import build_parser
    from streamhash.config import ServerSettings, WorkerSettings

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    ours = {name: svc for name, svc in compose["services"].items() if "build" in svc}
    assert {"worker-a", "query-a", "learner", "router"} <= set(ours)
    for name, svc in ours.items():
        build = svc["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        script, *args = svc["command"]
        assert script in scripts, f"{name} runs {script}, not a console script of the package"
        module, func = scripts[script].split(":")
        assert callable(getattr(importlib.import_module(module), func)), scripts[script]
        if script == "streamhash":
            try:
                build_parser().parse_args(args)
            except SystemExit:
                pytest.fail(f"{name}: `streamhash {' '.join(args)}` does not parse")
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        host = (env.get("STREAMHASH_SERVER__HOST", ServerSettings().host) if args[:1] == ["serve"]
                else env.get("STREAMHASH_WORKER__METRICS_HOST", WorkerSettings().metrics_host))
        assert host not in ("127.0.0.1", "localhost"), f"{name} listens on {host}: no other container reaches it"

    kafka = compose["services"]["kafka"]
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"], "KRaft: no ZooKeeper service"
    assert compose["services"]["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"

    def after(name: str) -> set[str]:  # what a service starts after, directly or not
        direct = set(compose["services"][name].get("depends_on", {}))
        return direct.union(*(after(d) for d in direct))

    for name in ours:
        assert "kafka-init" in after(name), f"{name} may start before its topics exist"


def test_compose_topics_match_the_code(compose):
    """kafka-init creates what streamhash.kafka.topics.ensure_topics would: the codes topic
    co-partitioned with the images topic, the models topic one compacted partition."""
    from streamhash.config import KafkaSettings
    from streamhash.kafka.modelbus import MAX_MODEL_BYTES

    topics = _kafka_topics(compose)
    env = compose["services"]["worker-a"]["environment"]
    k = KafkaSettings()
    names = {field: env.get(f"STREAMHASH_KAFKA__{field.upper()}", getattr(k, field))
             for field in ("topic", "dlq_topic", "codes_topic", "models_topic", "changelog_topic")}
    for field, topic in names.items():
        assert topic in topics, f"kafka-init does not create {topic} ({field})"

    def partitions(topic):
        return int(re.search(r"--partitions (\d+)", topics[topic]).group(1))

    n = partitions(names["topic"])
    assert partitions(names["codes_topic"]) == n, "the codes topic must be co-partitioned with the images topic"
    assert partitions(names["dlq_topic"]) == n
    assert partitions(names["changelog_topic"]) == n and "cleanup.policy=compact" in topics[names["changelog_topic"]]
    assert int(env["STREAMHASH_KAFKA__TOPIC_PARTITIONS"]) == n
    models = topics[names["models_topic"]]
    assert partitions(names["models_topic"]) == 1 and "cleanup.policy=compact" in models
    assert f"max.message.bytes={MAX_MODEL_BYTES}" in models


def test_compose_machines_share_no_disk(compose):
    """Several machines, each a worker and a query server over a root on the machine's own volume, which no other
    machine mounts (a partition that moves is restored from Kafka, not read from a shared disk); the worker and
    the query server of a machine open it in the host PID namespace (LMDB records readers by PID in lock.mdb);
    workers publish no fixed host port."""
    services = compose["services"]
    machines = _machines(compose)
    assert len(machines) >= 2, "the compose file should run several machines"
    owners: dict[str, str] = {}
    for worker_name, query_name in machines:
        worker, query = services[worker_name], services[query_name]
        assert "container_name" not in worker and "hostname" not in worker
        for port in worker.get("ports", []):
            fixed = bool(port.get("published")) if isinstance(port, dict) else ":" in str(port)
            assert not fixed, f"{worker_name} publishes a fixed host port: {port}"
        root = worker["environment"]["STREAMHASH_STORE__PATH"]
        w_vols = _volumes(worker)
        assert any(root.startswith(dst.rstrip("/") + "/") for dst in w_vols.values()), "the root is not on the volume"
        assert not root.rstrip("/").endswith("shard-0")  # not a pre-shard store directory
        for src in w_vols:
            assert src in compose["volumes"] and owners.setdefault(src, worker_name) == worker_name, \
                f"{src} is mounted by {owners.get(src)} and {worker_name}: machines share no disk"
        assert query["environment"]["STREAMHASH_STORE__PATH"] == root
        assert {s for s, d in _volumes(query).items() if w_vols.get(s) == d}, f"{query_name} is not beside {worker_name}"
        assert worker.get("pid") == "host" and query.get("pid") == "host"
        url = urllib.parse.urlsplit(query["environment"]["STREAMHASH_SERVER__ADVERTISE_URL"])
        assert url.hostname == query_name and str(url.port) == str(query["environment"]["STREAMHASH_SERVER__PORT"])
    learner = services["learner"]
    assert "STREAMHASH_STORE__PATH" not in learner["environment"], "the learner reads the changelog, not a root"
    assert not set(_volumes(learner)) & set(owners), "the learner mounts a machine's disk"


def test_compose_one_learner_and_a_discovering_router(compose):
    services = compose["services"]
    learner = services["learner"]
    assert learner.get("deploy", {}).get("replicas", 1) == 1, "exactly one learner owns the model"
    assert learner["environment"]["STREAMHASH_KAFKA__BOOTSTRAP_SERVERS"] == \
        services["worker-a"]["environment"]["STREAMHASH_KAFKA__BOOTSTRAP_SERVERS"]
    router = services["router"]
    assert "STREAMHASH_STORE__PATH" not in router["environment"] and not router.get("volumes"), "a router has no store"
    assert router["environment"]["STREAMHASH_SERVER__DISCOVER"] == "true" and \
        "STREAMHASH_SERVER__SHARDS" not in router["environment"], "the router finds the query servers through Kafka"
    assert float(router["environment"]["STREAMHASH_SERVER__SHARD_TIMEOUT_S"]) > 0


def test_compose_bind_mounts_exist(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (DEPLOY / src).exists(), f"{name} mounts missing {src}"
    assert (DEPLOY / "grafana" / "provisioning" / "dashboards").is_dir()


def test_compose_env_maps_onto_settings(compose, monkeypatch):
    """Every STREAMHASH_* variable names a real Settings field and the values validate."""
    from pydantic import BaseModel

    from streamhash.config import Settings

    for name, svc in compose["services"].items():
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items() if k.startswith("STREAMHASH_")}
        if not env:
            continue
        for key in env:
            model: type[BaseModel] = Settings
            parts = key.removeprefix("STREAMHASH_").lower().split("__")
            for part in parts[:-1]:
                assert part in model.model_fields, f"{name}: {key}: no settings section {part!r}"
                model = model.model_fields[part].annotation
            assert parts[-1] in model.model_fields, f"{name}: {key} is not a setting (typo?)"
        for k in [k for k in os.environ if k.startswith("STREAMHASH_")]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s = Settings()
        for key, value in env.items():
            got = s
            for part in key.removeprefix("STREAMHASH_").lower().split("__"):
                got = getattr(got, part)
            if isinstance(got, list):  # a list setting is written URL,URL in the environment
                got = ",".join(map(str, got))
            if isinstance(got, bool):  # written true / false
                got = str(got).lower()
            assert str(got) == value, f"{name}: {key}={value!r} read back as {got!r}"


def test_prometheus_scrapes_the_compose_services(compose, prom_config):
    jobs = {j["job_name"]: j for j in prom_config["scrape_configs"]}
    services = compose["services"]
    env = services["worker-a"]["environment"]
    ports = {
        "worker": env["STREAMHASH_WORKER__METRICS_PORT"],
        "learner": services["learner"]["environment"]["STREAMHASH_LEARN__METRICS_PORT"],
        "query": services["query-a"]["environment"]["STREAMHASH_SERVER__PORT"],
        "router": services["router"]["environment"]["STREAMHASH_SERVER__PORT"],
    }
    # One worker and one query server per machine: DNS service discovery on a network alias they all carry.
    for kind, names in (("worker", [w for w, _ in _machines(compose)]), ("query", [q for _, q in _machines(compose)])):
        job = jobs[JOBS[kind]]
        assert "static_configs" not in job, f"every machine's {kind} is found by DNS, not listed"
        assert any(kind in d["names"] and d.get("type", "SRV") == "A" and str(d["port"]) == ports[kind]
                   for d in job["dns_sd_configs"])
        for name in names:
            assert kind in services[name]["networks"]["default"]["aliases"], f"{name} lacks the alias {kind}"
    for kind in ("learner", "router"):
        job = jobs[JOBS[kind]]
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert f"{kind}:{ports[kind]}" in targets, f"{JOBS[kind]} does not scrape {kind}:{ports[kind]}"
        for t in targets:
            assert t.split(":")[0] in services, f"scrape target {t} is not a compose service"
        assert job.get("metrics_path", "/metrics") == "/metrics"
    # A `shard` target label would collide with the per-shard series' own label (renamed exported_shard).
    for job in prom_config["scrape_configs"]:
        for sc in job.get("static_configs", []):
            assert "shard" not in sc.get("labels", {}), f"{job['job_name']} sets a shard target label"
        assert not any(r.get("target_label") == "shard" for r in job.get("relabel_configs", []))
    assert "alerts.yml" in prom_config["rule_files"]
    alerts = ALERTS.read_text()
    for job in JOBS.values():
        assert f'job="{job}"' in alerts, f"no alert selects job {job}"


def test_alerts_cover_shards_and_processes():
    """The scale-out's alerts exist, and each is unit-tested firing in alerts_test.yml."""
    defined = set(re.findall(r"^\s*- alert:\s*(\S+)", ALERTS.read_text(), flags=re.M))
    required = {
        "StreamhashShardBehindLearner",  # a shard at an older generation than the learner published
        "StreamhashShardNotOpen",  # a partition's shard open in no worker
        "StreamhashShardOpenStuck",  # a worker cannot open an assigned partition's shard
        "StreamhashLearnedCodesMissing",  # codes topic not co-partitioned
        "StreamhashLearnerDown",
        "StreamhashNoWorkers",  # DNS discovery: a dead worker is no target, so `up == 0` cannot see it
        "StreamhashRouterDown",
        "StreamhashRouterPartialAnswers",
        "StreamhashWorkerDown",
        "StreamhashQueryServerDown",
    }
    assert required <= defined, f"missing alerts: {sorted(required - defined)}"
    text = ALERTS_TEST.read_text()
    fired = {m.group(1) for m in re.finditer(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:\s*\n", text)}
    assert required <= fired, f"alerts never tested firing: {sorted(required - fired)}"


# --------------------------------------------------------------------------------------------
# a real Prometheus scraping streamhash metrics


@needs_prometheus
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_real_prometheus_scrapes_streamhash_metrics(tmp_path):
    from prometheus_client import start_http_server

    from streamhash import metrics

    REGISTRY = metrics.WORKER_REGISTRY  # what a worker serves
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=REGISTRY)
    metrics_port = httpd.server_port
    prom_port = _free_port()
    config = tmp_path / "prometheus.yml"
    # JSON is YAML; the rule file is the real one, so Prometheus itself loads and evaluates it.
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{
            "job_name": "streamhash-test",
            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
        }],
    }))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{prom_port}"

    def fail(msg: str):
        log.flush()
        pytest.fail(f"{msg}\nprometheus log:\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}")

    def wait_for(what: str, check, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                fail(f"prometheus exited with {proc.returncode} while waiting for {what}")
            try:
                last = check()
                if last is not None:
                    return last
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        fail(f"timed out waiting for {what} (last: {last!r})")

    def query(expr: str) -> float | None:
        data = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        result = data["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def equals(expr: str, want: float):
        def check():
            got = query(expr)
            return got if got is not None and abs(got - want) < 1e-9 else None
        return check

    try:
        wait_for("/-/ready", lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200 or None)
        consumed = 'streamhash_messages_consumed_total{job="streamhash-test"}'
        before = REGISTRY.get_sample_value("streamhash_messages_consumed_total") or 0.0

        metrics.MESSAGES_CONSUMED.inc(1000)
        wait_for("first scrape", equals(consumed, before + 1000))
        metrics.MESSAGES_CONSUMED.inc(234)
        wait_for("second scrape", equals(consumed, before + 1234))
        assert REGISTRY.get_sample_value("streamhash_messages_consumed_total") == before + 1234
        assert query('up{job="streamhash-test"}') == 1.0

        # A per-shard series keeps its own `shard` label (no target label renames it to exported_shard).
        shard = "streamhash.images[0]"
        metrics.SHARD_ITEMS.labels(shard=shard).set(77)
        try:
            wait_for("a per-shard series", equals(f'max by (shard) (streamhash_shard_items{{shard="{shard}"}})', 77))
        finally:
            metrics.SHARD_ITEMS.remove(shard)

        # The real alerts.yml is loaded and every rule evaluates without error.
        want_alerts = set(re.findall(r"^\s*- alert:\s*(\S+)", ALERTS.read_text(), flags=re.M))

        def rules_healthy():
            groups = _get_json(f"{base}/api/v1/rules")["data"]["groups"]
            rules = {r["name"]: r["health"] for g in groups for r in g["rules"]}
            return rules if set(rules) == want_alerts and set(rules.values()) == {"ok"} else None

        wait_for("alert rules evaluated", rules_healthy)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
