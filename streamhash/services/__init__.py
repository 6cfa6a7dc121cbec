"""The long-running processes as wiring over the library: ingest worker, learner thread, query server,
demo, and the helpers that start and watch them. The library outside this package never imports it."""
