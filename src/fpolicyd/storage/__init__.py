"""Local durable I/O (layer 2): the spool, disk-full episodes, the SQLite dedup store and the dedup journal, the audit
ledgers, the JSON Lines file writer, the routes file, and the one fault-injection seam. Each module states its
durability contract; ``docs/architecture.md`` (Storage) has the spool's format and measurements.
"""
