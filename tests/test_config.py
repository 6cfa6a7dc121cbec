"""Settings: environment with the STREAMHASH_ prefix and `__` nesting, CLI flags on top, secrets hidden."""

import logging

import pytest
from pydantic import ValidationError

from streamhash.cli import build_parser, document_env, settings_from_args
from streamhash.config import KafkaSettings, SecuritySettings, Settings, load_settings
from streamhash.errors import ConfigError


def test_env_nested_and_flags_override(monkeypatch):
    monkeypatch.setenv("STREAMHASH_KAFKA__BOOTSTRAP_SERVERS", "envhost:9092")
    monkeypatch.setenv("STREAMHASH_MODEL__BITS", "64")
    monkeypatch.setenv("STREAMHASH_DEMO__LIMIT", "123")
    args = document_env(build_parser()).parse_args(["worker", "--bits", "16", "--store", "/tmp/x"])
    s = settings_from_args(args)
    assert s.kafka.bootstrap_servers == "envhost:9092"  # env, no flag given
    assert s.model.bits == 16 and str(s.store.path) == "/tmp/x"  # flags win
    assert load_settings().demo.limit == 123


def test_every_settings_flag_names_its_env_variable():
    parser = document_env(build_parser())
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if "." in action.dest:
                section, field = action.dest.split(".", 1)
                assert f"STREAMHASH_{section.upper()}__{field.upper()}" in action.help, (name, action.dest)


def test_secrets_are_hidden_in_the_startup_log(monkeypatch, caplog):
    monkeypatch.setenv("STREAMHASH_KAFKA__SASL_PASSWORD", "hunter2")
    s = load_settings()
    assert s.kafka.sasl_password.get_secret_value() == "hunter2"
    with caplog.at_level(logging.INFO):
        s.log_startup("test")
    assert "hunter2" not in caplog.text and "**********" in caplog.text


def test_invalid_values_are_refused(monkeypatch):
    monkeypatch.setenv("STREAMHASH_MODEL__BITS", "12")
    with pytest.raises(ValidationError, match="multiple of 8"):
        load_settings()


# Every internal topic follows the images topic, whichever source set it (issue 26: `--topic B.images` on the
# command line kept the models and codes topics of the environment's topic, and the DLQ never followed at all).
CONFIG_ENV = "STREAMHASH_CONFIG"  # the settings file's variable: part of the contract (README, Configuration)
DERIVED_B = {"topic": "B.images", "dlq_topic": "B.images.dlq", "models_topic": "B.models", "codes_topic": "B.codes"}


def _topics(s) -> dict:
    return {name: getattr(s.kafka, name) for name in DERIVED_B}


@pytest.mark.parametrize("command", ["worker", "learner"])
def test_topic_flag_moves_every_internal_topic(monkeypatch, command):
    monkeypatch.setenv("STREAMHASH_KAFKA__TOPIC", "A.images")  # the environment names another pipeline
    args = document_env(build_parser()).parse_args([command, "--topic", "B.images"])
    assert _topics(settings_from_args(args)) == DERIVED_B


def test_topic_environment_moves_every_internal_topic(monkeypatch):
    monkeypatch.setenv("STREAMHASH_KAFKA__TOPIC", "B.images")
    assert _topics(load_settings()) == DERIVED_B


def test_topic_in_the_config_file_moves_every_internal_topic(monkeypatch, tmp_path):
    path = tmp_path / "streamhash.toml"
    path.write_text('[kafka]\ntopic = "B.images"\ngroup_id = "b-workers"\n')
    monkeypatch.setenv(CONFIG_ENV, str(path))
    s = load_settings()
    assert _topics(s) == DERIVED_B and s.kafka.group_id == "b-workers"


def test_sources_rank_flag_over_environment_over_file(monkeypatch, tmp_path):
    path = tmp_path / "streamhash.toml"
    path.write_text('[kafka]\ntopic = "F.images"\nbootstrap_servers = "file:9092"\n[model]\nbits = 16\n')
    monkeypatch.setenv(CONFIG_ENV, str(path))
    monkeypatch.setenv("STREAMHASH_KAFKA__TOPIC", "E.images")
    monkeypatch.setenv("STREAMHASH_MODEL__BITS", "64")
    s = load_settings()
    assert (s.kafka.topic, s.kafka.models_topic, s.kafka.bootstrap_servers, s.model.bits) == \
        ("E.images", "E.models", "file:9092", 64)
    args = document_env(build_parser()).parse_args(["worker", "--topic", "C.images"])
    assert settings_from_args(args).kafka.dlq_topic == "C.images.dlq"


def test_a_missing_config_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings()


def test_explicit_internal_topics_are_kept(monkeypatch):
    monkeypatch.setenv("STREAMHASH_KAFKA__DLQ_TOPIC", "dead")
    monkeypatch.setenv("STREAMHASH_KAFKA__MODELS_TOPIC", "m")
    args = document_env(build_parser()).parse_args(["worker", "--topic", "B.images"])
    k = settings_from_args(args).kafka
    assert (k.dlq_topic, k.models_topic, k.codes_topic) == ("dead", "m", "B.codes")
    assert KafkaSettings(topic="x", codes_topic="c").codes_topic == "c"


def test_default_topic_names_are_unchanged():
    assert _topics(Settings()) == {"topic": "streamhash.images", "dlq_topic": "streamhash.images.dlq",
                                   "models_topic": "streamhash.models", "codes_topic": "streamhash.codes"}


def test_api_key_settings_from_the_environment(monkeypatch, caplog):
    monkeypatch.setenv("STREAMHASH_SECURITY__API_KEY", "k-123")
    monkeypatch.setenv("STREAMHASH_SECURITY__API_KEY_EXEMPT", "/healthz, /ui/*")
    s = load_settings()
    assert s.security.api_key.get_secret_value() == "k-123" and s.security.api_key_exempt == ["/healthz", "/ui/*"]
    assert SecuritySettings().api_key_exempt == ["/", "/ui/*", "/healthz", "/metrics"]
    with caplog.at_level(logging.INFO):
        s.log_startup("test")
    assert "k-123" not in caplog.text
    monkeypatch.setenv("STREAMHASH_SECURITY__API_KEY", "  ")
    with pytest.raises(ValidationError, match="must not be blank"):
        load_settings()
