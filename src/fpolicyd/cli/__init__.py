"""The ``fpolicyd`` command line, the top layer: nothing else in fpolicyd imports it.

- :mod:`~fpolicyd.cli.main`: ``main`` (the ``fpolicyd`` script and ``python -m fpolicyd``), the parser of every
  command, and the ``serve`` and ``config`` commands; the other commands' modules are imported only when their
  parser is built (``fpolicyd healthcheck`` builds its own alone).
- :mod:`~fpolicyd.cli.parser`: the ``argparse`` parser class (did-you-mean for a mistyped option or command).
- :mod:`~fpolicyd.cli.settings_flags`: command-line flags generated from :class:`fpolicyd.config.Settings`.
- One module per other command: :mod:`~fpolicyd.cli.healthcheck`, :mod:`~fpolicyd.cli.routes`,
  :mod:`~fpolicyd.cli.simulate`, :mod:`~fpolicyd.cli.replaytest`, :mod:`~fpolicyd.cli.capture`,
  :mod:`~fpolicyd.cli.ontap`.
"""
