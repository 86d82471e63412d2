"""``fpolicyd replay-test``: a persistent-store replay storm against a daemon, verified at its JSON Lines sink.

K simulated ONTAP nodes (one connection and session each, the simulator's handshake and frames) go through:

1. **live**: notifications generated now and sent at once;
2. **outage**: the node closes its connection and keeps generating into a per-node backlog for ``outage_s``,
   as ONTAP's persistent store holds notifications while no server is connected;
3. **replay**: the node reconnects and sends the backlog interleaved with new live notifications, live first
   (ONTAP prioritises live events), optionally shuffled (``shuffle``) and with some backlog notifications sent
   twice (``duplicates``).

Optionally the daemon is restarted half-way through the replay on the same data directory (``restart_daemon``):
gracefully (``restart_mode`` graceful: drain, checkpoint), or, with the daemon running as a ``python -m fpolicyd
serve`` subprocess, killed with SIGKILL (``restart_mode`` kill: no drain, no checkpoint). The nodes see the
disconnect, reconnect and carry on.

A SIGKILL is only survivable without loss if "delivered" means "durable". In ONTAP's asynchronous mode a
notification counts as delivered once the socket accepted it, so what sat in the daemon's kernel buffer or memory
at the kill is gone. The kill mode therefore plays a **synchronous** engine: the daemon answers a SCREEN_REQ with
SCREEN_RESP only once the event is in its spool (``engine_mode`` sync), each node keeps at most ``sync_window``
requests unanswered (ONTAP's max-server-reqs), and after a reconnect it sends again every request the lost
session had not answered, as ONTAP retries a request whose server went away.

With ``instances`` N > 1, replay-test runs N daemons (each with its own data and JSON Lines directories); every
node holds one session per daemon and round-robins its chunks over them (live and backlog alike), as an ONTAP
engine with several primary servers does; the outage closes all of a node's sessions and the backlog is replayed
over all of them. Verification is over the union of the sinks (an id delivered by two instances is a duplicate,
counted), and the report adds each instance's figures (``instances``). The restart modes and the sync engine are
refused with N > 1.

The sink verified is the daemon's JSON Lines directory, or an SQS queue (``sink`` ``sqs:URL``, or ``eventbridge:BUS``
checked through a rule that targets the queue ``verify_queue``): the queue is drained (ReceiveMessage with
WaitTimeSeconds, DeleteMessageBatch) while the storm runs and afterwards, bounded in time.

Every notification's ``event_id`` is computed by the generator (:meth:`fpolicyd.simulator.generate.NodeStream.event_id`,
the recipe of ``fpolicyd.events.normalize``), so the verifier only needs a set of ids (kept as 128-bit ints) to
say what was delivered, lost or delivered twice; the backlog is held as small specs and rendered when sent, so
memory stays bounded at a million events. The sink is tailed while the storm runs (progress, arrival latency).

What the daemon should flag (``metadata.replayed`` / ``out_of_order`` / ``duplicate``) is mirrored on the
sending side from what each node sent (a node's own source address on loopback is its node key in the daemon,
see ``fpolicyd.pipeline.replay``) and compared with what the sink holds.

The modules, in the order the data flows through a run:

- :mod:`~fpolicyd.replaytest.config`: :class:`~fpolicyd.replaytest.config.ReplayTestConfig` (what to run, checked
  when built), ``RestartMode``, ``ReplayTestError``;
- :mod:`~fpolicyd.replaytest.node`: the simulated nodes, which generate, send and reconnect, and mirror what the
  daemon should flag;
- :mod:`~fpolicyd.replaytest.daemons`: the daemon under test when none is given, in-process or a subprocess;
- :mod:`~fpolicyd.replaytest.tails`: reading the sink (a JSON Lines directory or an SQS queue), latency figures;
- :mod:`~fpolicyd.replaytest.run`: :func:`~fpolicyd.replaytest.run.run_replay_test`, which puts these together:
  progress, the restart, settling, the final read and the report;
- :mod:`~fpolicyd.replaytest.summary` and :mod:`~fpolicyd.replaytest.plot`: the report as a table, the timeline as
  an HTML plot.

The command itself (flags, output, exit codes) is :mod:`fpolicyd.cli.replaytest`.
"""
