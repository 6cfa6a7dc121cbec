"""What every command shares: the settings from the flags, the one-line failure, file and broker checks."""

from __future__ import annotations

import argparse

from streamhash.config import Settings, load_settings, setup_logging
from streamhash.errors import EXIT_NOINPUT, EXIT_UNAVAILABLE, EXIT_USAGE


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Dotted ``dest`` names (``kafka.topic``) become nested overrides on top of the environment."""
    overrides: dict = {}
    for dest, value in vars(args).items():
        if "." not in dest or value is None:
            continue
        section, field = dest.split(".", 1)
        overrides.setdefault(section, {})[field] = value
    return load_settings(overrides)


def settings_with_logging(args) -> Settings:
    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    return settings


class CommandFailed(Exception):
    """A command that cannot do what was asked: one line for stderr and the exit code of its kind."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise CommandFailed(f"no such {what} file: {path}", EXIT_NOINPUT) from None
    except IsADirectoryError:
        raise CommandFailed(f"{path} is a folder, not an {what} file", EXIT_NOINPUT) from None
    except OSError as exc:
        raise CommandFailed(f"cannot read {what} file {path}: {exc.strerror or exc}", EXIT_NOINPUT) from None


def check_broker(settings: Settings, timeout_s: float = 5.0) -> None:
    """Fail in seconds, in words, when no bootstrap server accepts a connection (kafka-python spends its whole
    request timeout, 30 s, before it says ``Unable to bootstrap``)."""
    import socket

    servers = settings.kafka.bootstrap_servers
    if not servers:
        raise CommandFailed("no broker: set STREAMHASH_KAFKA__BOOTSTRAP_SERVERS or --bootstrap-servers", EXIT_USAGE)
    reasons = []
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s).close()
            return
        except ValueError:
            raise CommandFailed(f"bad bootstrap server {server!r}: expected host:port", EXIT_USAGE) from None
        except OSError as exc:
            reasons.append(f"{server.strip()}: {exc.strerror or exc}")
    raise CommandFailed(f"cannot reach the broker ({'; '.join(reasons)}): start one (`streamhash broker`) or set "
                        "STREAMHASH_KAFKA__BOOTSTRAP_SERVERS", EXIT_UNAVAILABLE)

