"""The Kafka consumer processes' entry points (thin: parse arguments, call :mod:`streamhash.services`)."""
