"""One settings model for every process.

Every field can be set by environment variable with the ``STREAMHASH_`` prefix, nested
sections joined by ``__`` (``STREAMHASH_KAFKA__BOOTSTRAP_SERVERS=host:9092``), or in a TOML file named by
``STREAMHASH_CONFIG`` (``[kafka]`` / ``topic = "..."``). CLI flags override the environment, which overrides
the file; all of them go through this model in one validation, so values derived from others (the internal
topics' names from ``kafka.topic``) follow whichever source set them.

The sections are defined in :mod:`.kafka` (Kafka client and security) and :mod:`.sections` (the rest);
every name is importable from here.

>>> s = Settings(kafka={"bootstrap_servers": "k:9092"})
>>> s.kafka.bootstrap_servers
'k:9092'
>>> "secret" in s.redacted_json()
False
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from streamhash.config.kafka import KafkaSettings, SecuritySettings, derived_topics
from streamhash.config.sections import (
    DataSettings, DemoSettings, ImageSettings, LearnSettings, ModelSettings, ProduceSettings, ServerSettings,
    StoreSettings, WorkerSettings,
)
from streamhash.errors import ConfigError

__all__ = [
    "CONFIG_ENV", "DataSettings", "DemoSettings", "ImageSettings", "KafkaSettings", "LearnSettings", "ModelSettings",
    "ProduceSettings", "SecuritySettings", "ServerSettings", "Settings", "StoreSettings", "WorkerSettings",
    "derived_topics", "load_settings", "setup_logging",
]

log = logging.getLogger(__name__)



CONFIG_ENV = "STREAMHASH_CONFIG"  # names a TOML settings file, below the environment and the flags


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMHASH_", env_nested_delimiter="__", extra="ignore")

    log_level: str = "INFO"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    image: ImageSettings = Field(default_factory=ImageSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    learn: LearnSettings = Field(default_factory=LearnSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    produce: ProduceSettings = Field(default_factory=ProduceSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: CLI flags (init), the environment, the STREAMHASH_CONFIG file. No implicit .env: a stray
        # file in the working directory must not change a process's settings.
        path = os.environ.get(CONFIG_ENV)
        if not path:
            return init_settings, env_settings
        if not Path(path).is_file():
            raise ConfigError(f"{CONFIG_ENV}={path}: no such file (a TOML settings file)")
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=Path(path))

    def redacted_json(self) -> str:
        """JSON of every setting with secrets shown as ``**********``."""
        return json.dumps(json.loads(self.model_dump_json()), sort_keys=True)

    def log_startup(self, process: str) -> None:
        log.info("%s starting with settings %s", process, self.redacted_json())


def load_settings(overrides: dict | None = None) -> Settings:
    """CLI overrides (nested dicts, ``None`` values ignored) over the environment over the ``STREAMHASH_CONFIG``
    file, validated once from the merged raw values: a derived value (an internal topic's name) follows the
    ``kafka.topic`` of the highest source, not the one validated before the flags were applied."""
    return Settings(**_without_none(overrides or {}))


def _without_none(values: dict) -> dict:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None}


def setup_logging(level: str = "INFO") -> None:
    """One log format for every process, on stderr."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # kafka-python logs every connection at INFO; keep our own logs readable.
    for noisy in ("kafka", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
