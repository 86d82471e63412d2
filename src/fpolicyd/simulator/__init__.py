"""The ONTAP node simulator: the peer of every integration test, ``replay-test`` and benchmark.

* :mod:`fpolicyd.simulator.generate`: pure, deterministic generation of a node's notifications (specs, frames,
  requests, the manifest record).
* :mod:`fpolicyd.simulator.peer`: :class:`~fpolicyd.simulator.peer.OntapPeer`, one connection to an FPolicy
  server speaking as an ONTAP node (connect, the NEGO exchange, frames out and in, close).
* :mod:`fpolicyd.simulator.client`: ``fpolicyd simulate``'s client (:class:`~fpolicyd.simulator.client.SimulatorConfig`,
  :func:`~fpolicyd.simulator.client.run`, the per-node driver and its reports).
"""
