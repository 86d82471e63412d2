"""The pure stages between a decoded notification and a spool record, and behind the spool (layer 1: no I/O, no
clock; every call that needs the time takes ``now``): the ingest step, back-pressure, the dedup rules, settle,
routing, replay tracking, the processing stage, redaction, and the C accelerator's wrapper.
"""
