"""Log lines: the structlog chain, and the sinks that ship a run's lines elsewhere.

``chain`` builds the processor chain every driver line goes through (and the one logfmt
quoting, :func:`~conveyor_driver.logs.chain.logfmt_value`); ``sink`` says what a sink is
(:class:`~conveyor_driver.logs.sink.LogSink`) and how it reports; ``nats`` and ``loki`` are
the sinks; ``stdlib`` bridges the standard library's ``logging`` into the chain. Nothing
here imports the runtime: a sink that ships over NATS is handed the driver's publisher.
"""
