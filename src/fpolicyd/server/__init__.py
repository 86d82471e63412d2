"""The daemon's asyncio edges (layer 5): the listener and its budgets, TLS, one connection per ONTAP session, the
spooler (reader side of the spool), the processing worker, the delivery process, preflight checks and wire capture.
"""
