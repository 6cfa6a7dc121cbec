"""``streamhash`` command line: broker, produce, worker, learner, serve, query, delete, dlq, demo, eval.

Every flag maps to a settings field (``dest="section.field"``), so each one can also be set by
environment variable (``STREAMHASH_SECTION__FIELD``); flags win over the environment.

A command that cannot do what was asked says why in one line on stderr and exits with a code of its
kind (``streamhash.errors``): 1 no hit, 2 usage, 3 dataset missing, 65 input refused by the contract,
66 file missing or unreadable, 69 server or broker unreachable, 70 server error, 78 configuration.

The parts: :mod:`.parser` (the flags, ``main``, the process commands), :mod:`.produce`, :mod:`.commands`
(query, delete, dlq) and :mod:`.common` (settings from the flags, the one-line failure). The names below
are the package's interface: the console scripts (``streamhash.cli:main``) and ``consumers/`` use them.
"""

from streamhash.cli.common import CommandFailed, settings_from_args
from streamhash.cli.parser import (
    build_parser, demo_arguments, document_env, learner_arguments, main, serve_arguments, worker_arguments,
)

__all__ = [
    "CommandFailed", "build_parser", "demo_arguments", "document_env", "learner_arguments", "main",
    "serve_arguments", "settings_from_args", "worker_arguments",
]
