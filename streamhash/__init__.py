"""streamhash: online deep hashing over a Kafka stream."""

__version__ = "0.1.0"
