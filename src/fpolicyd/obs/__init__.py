"""Observability, a leaf every layer may use: structured logs, the metrics registry and its collector, liveness and
readiness, the HTTP server, rate-limited log lines, sd_notify. It imports nothing of fpolicyd but ``errors``: it
reads other packages' figures through the ``typing.Protocol`` classes it defines (``tests/unit/test_obs_leaf.py``).
"""
