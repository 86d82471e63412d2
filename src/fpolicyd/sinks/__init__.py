"""Delivery (layer 3): one worker per sink reads durable spool records and acks them (``runner.py``); the senders:
``aws/`` (SQS and EventBridge, one module per step of the data flow), ``local.py`` (JSON Lines, stdout); the retry
policy, the dead-letter files, the DynamoDB dedup store, and ``factory.py`` (sink URIs → senders).
"""
