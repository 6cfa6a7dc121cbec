"""Kafka over TLS (issue 26: Kafka had SASL settings but no TLS). The embedded broker (Tansu) cannot serve TLS, so
the settings are checked two ways: the keyword arguments every client gets (``KafkaSettings.client_kwargs``), and
a real kafka-python client's TLS handshake against a local TLS listener that demands a client certificate
(mutual TLS, the client's key behind a passphrase): the handshake completes only if the CA, the certificate,
the key and its passphrase all reached the client."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from pydantic import ValidationError

from streamhash.config import KafkaSettings, Settings


def test_plaintext_sends_no_tls_arguments():
    kw = KafkaSettings(bootstrap_servers="k:9092").client_kwargs()
    assert kw["security_protocol"] == "PLAINTEXT" and not any(name.startswith("ssl_") for name in kw)


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_tls_files_reach_the_client_arguments(protocol, tmp_path):
    k = KafkaSettings(bootstrap_servers="a:9093,b:9093", security_protocol=protocol, ssl_cafile=tmp_path / "ca.pem",
                      ssl_certfile=tmp_path / "c.pem", ssl_keyfile=tmp_path / "k.pem", ssl_password="pw",
                      **({"sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "worker", "sasl_password": "sp"}
                         if protocol == "SASL_SSL" else {}))
    kw = k.client_kwargs()
    assert kw["security_protocol"] == protocol and kw["bootstrap_servers"] == ["a:9093", "b:9093"]
    assert (kw["ssl_cafile"], kw["ssl_certfile"], kw["ssl_keyfile"], kw["ssl_password"]) == \
        (str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), "pw")
    assert kw["ssl_check_hostname"] is True
    if protocol == "SASL_SSL":  # SASL over TLS: both sets
        assert (kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("SCRAM-SHA-512", "worker", "sp")
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):  # each takes every one of them
        assert set(kw) - {"bootstrap_servers"} <= set(client.DEFAULT_CONFIG), client


def test_tls_settings_are_checked_and_secret():
    with pytest.raises(ValidationError, match="use SSL or SASL_SSL"):
        KafkaSettings(ssl_cafile="ca.pem")  # a TLS file with PLAINTEXT: a typo in the protocol, not plain text
    with pytest.raises(ValidationError, match="go together"):
        KafkaSettings(security_protocol="SSL", ssl_certfile="c.pem")
    with pytest.raises(ValidationError):
        KafkaSettings(security_protocol="TLS")
    s = Settings(kafka={"security_protocol": "SSL", "ssl_password": "hunter2"})
    assert "hunter2" not in s.redacted_json()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_a_kafka_client_completes_mutual_tls_with_these_settings(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    broker_cert, broker_key = tmp_path / "broker.pem", tmp_path / "broker.key"
    client_cert, client_key = tmp_path / "client.pem", tmp_path / "client.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(broker_key), "-out", str(broker_cert), "-days", "1",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1")
    _openssl("genrsa", "-aes256", "-passout", "pass:pw", "-out", str(client_key), "2048")
    _openssl("req", "-x509", "-new", "-key", str(client_key), "-passin", "pass:pw", "-out", str(client_cert), "-days", "1",
             "-subj", "/CN=streamhash-worker")

    def handshake(**tls) -> dict:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(broker_cert, broker_key)
        ctx.verify_mode = ssl.CERT_REQUIRED  # the broker demands the client's certificate
        ctx.load_verify_locations(client_cert)
        listener = socket.create_server(("127.0.0.1", 0))
        seen: dict = {}

        def serve():
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    seen["client"] = dict(x[0] for x in tls_conn.getpeercert()["subject"])["commonName"]
            except (ssl.SSLError, OSError) as exc:
                seen["error"] = repr(exc)

        def client():
            k = KafkaSettings(bootstrap_servers=f"127.0.0.1:{listener.getsockname()[1]}", security_protocol="SSL",
                              request_timeout_ms=2000, **tls)
            try:
                KafkaConsumer(**k.client_kwargs())  # never gets a Kafka answer: the handshake is what is checked
            except Exception as exc:  # noqa: BLE001 - no broker behind the listener
                seen.setdefault("client_error", repr(exc))

        threading.Thread(target=serve, daemon=True).start()
        threading.Thread(target=client, daemon=True).start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not ({"client", "error"} & seen.keys()):
            time.sleep(0.05)
        listener.close()
        return seen

    full = dict(ssl_cafile=broker_cert, ssl_certfile=client_cert, ssl_keyfile=client_key, ssl_password="pw")
    assert handshake(**full).get("client") == "streamhash-worker"
    # without its certificate the broker refuses the client; with another CA the client refuses the broker
    assert "client" not in handshake(ssl_cafile=broker_cert)
    assert "client" not in handshake(**{**full, "ssl_cafile": client_cert})
