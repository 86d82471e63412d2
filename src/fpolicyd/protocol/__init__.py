"""The FPolicy wire protocol, sans-IO (layer 0a: imports nothing of fpolicyd but errors): frames, frame readers and
varints, the XML and protobuf codecs, the canonical-body fast path, the messages, the 27 request types and the
session state machine. ``docs/protocol.md`` is the protocol as implemented.
"""
