"""Settings: environment with the STREAMHASH_ prefix and `__` nesting, CLI flags on top, secrets hidden."""

import logging

import pytest
from pydantic import ValidationError

from streamhash.cli import build_parser, document_env, settings_from_args
from streamhash.config import load_settings


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
