"""The long-running processes as wiring over the library: ingest worker, learner, query server, router,
demo, and the helpers that start and watch them. The library outside this package never imports it."""
