"""Typed exceptions, one family per package area, so callers catch what they can handle."""


class StreamhashError(Exception):
    """Base of every error raised on purpose by streamhash."""


class ConfigError(StreamhashError):
    """Settings that cannot work together."""


class RecordRejected(StreamhashError):
    """A message that breaks the image contract; it goes to the dead-letter topic.

    ``stage`` names the step that refused it (``key``, ``headers``, ``value``, ``decode``,
    ``shape``), so operators can count rejections by cause without reading payloads.
    """

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.message = message


class InternalRecordRejected(RecordRejected):
    """A record on an internal topic (``stage`` ``models`` or ``codes``) that is not adopted: malformed, unsigned
    or wrongly signed, out of order, or a network that does not load, fit or encode. It is dead-lettered and
    skipped; the previous model keeps serving and ingest goes on."""


class StoreError(StreamhashError):
    """The LMDB store cannot do what was asked."""


class StoreFullError(StoreError):
    """The disk (or the configured map-size ceiling) has no room left for a write."""


class StoreLockedError(StoreError):
    """Another process already has the store open for writing (one writer per store)."""


class SchemaMismatchError(StoreError):
    """The store on disk was written with settings this process does not match."""


class FeatureSpecMismatch(SchemaMismatchError):
    """A shard keeps stored inputs (features) of another backbone, cut or shape than this process's network makes:
    its items' features would not fit the network's trainable part (issue 23). Raised at open, naming both."""


class GenerationChanged(StoreError):
    """A re-encode swapped generations between encoding a batch and writing it; encode again."""

    def __init__(self, current: int, message: str):
        super().__init__(message)
        self.current = current


class BrokerError(StreamhashError):
    """The embedded broker could not be started or reached."""


class DatasetMissingError(StreamhashError):
    """A named dataset is not on disk; the message says how to get it."""


class BadQueryError(StreamhashError):
    """A query the index cannot answer (wrong width, bad k, unreadable image)."""


# Process exit codes (sysexits.h), one place so supervisors and tests agree.
EXIT_OK = 0
EXIT_NOT_FOUND = 1  # a search that found nothing (within the radius, or an empty index), as grep's 1
EXIT_USAGE = 2
EXIT_DATASET_MISSING = 3  # a named dataset is not on disk; the message says how to get it
EXIT_DATAERR = 65  # the input breaks the contract: an image the server or the producer's check refuses
EXIT_NOINPUT = 66  # a file or folder named on the command line is missing or unreadable
EXIT_UNAVAILABLE = 69  # the query server or the broker cannot be reached
EXIT_SOFTWARE = 70  # the server answered 5xx: its log says why
EXIT_TEMPFAIL = 75  # disk or map full: retried, then stopped with nothing lost; restart with back-off
EXIT_CONFIG = 78  # the store root or the topics are not what this build can use; the message says what to do
