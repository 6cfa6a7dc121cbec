"""Thin Kafka adapters: the embedded broker, topic set-up, producing and dead-lettering."""
