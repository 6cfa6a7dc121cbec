"""Long-running processes: the ingest worker and the query server. They wire library parts; no algorithm lives here."""
