"""SQS and EventBridge delivery, one module per job, in the order the data flows through them.

1. :mod:`~fpolicyd.sinks.aws.targets`: where events go (``SqsTarget``, ``EventBridgeTarget``), their limits and
   validation, and how the data-path calls are sent (``AwsDataPath``). Pure; the settings import it.
2. :mod:`~fpolicyd.sinks.aws.encode`: an event's JSON → one request entry (``Item`` → ``Entry``), measured as the
   service measures it; entries → batches within the service limits (``plan_batches``), what can never be sent
   set aside (``Oversize``); SQS packing of many events per message. Pure.
3. :mod:`~fpolicyd.sinks.aws.classify`: a response or a whole-call exception → what to do with each entry
   (``Outcome``: succeeded, retry, dead, blocked; ``ErrorKind``). Pure.
4. :mod:`~fpolicyd.sinks.aws.transport`: the lean HTTP client for SendMessageBatch and PutEvents (the SDK's
   endpoint, credentials and signer without its per-call machinery).
5. :mod:`~fpolicyd.sinks.aws.clients`: ``AwsClients``, one aiobotocore session and long-lived clients, the data
   path served by the lean client of 4 (or the SDK's).
6. :mod:`~fpolicyd.sinks.aws.deliver`: one request per batch, then classify (``send_*_batch``); the start-up
   health checks (``check_*``); ``deliver``, the retry loop that settles every entry as delivered,
   dead-lettered or pending (never dropped).
7. :mod:`~fpolicyd.sinks.aws.sender`: ``AwsSender``, the sink worker's sender: spool records → planned batches
   → ``deliver`` → the records still unsettled.

A module imports only modules before it in this list (and :mod:`fpolicyd.sinks.sqs_envelope`,
:mod:`fpolicyd.sinks.retry`, :mod:`fpolicyd.sinks.dead_letter`). Nothing is re-exported here: import from the
module that defines a name.
"""
