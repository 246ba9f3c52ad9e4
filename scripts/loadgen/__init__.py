"""The load generator behind ``scripts/loadtest.py``, one module per concern.

Start with ``cli.py`` (the command line and ``main``), then the scenario
you care about in ``scenarios/``. The map:

=====================  ======================================================
``cli.py``             command line, ``main``: lay out, spawn, run, report
``target.py``          where the load goes; refuses non-loopback without --host
``servers.py``         ``--spawn``: chatd, the websockets, Node ws and Go peers
``scenarios/``         one module per scenario (fanout, rooms, connect, idle,
                       gradagenda); ``messaging.py`` holds what the message
                       scenarios share (publishers, probes, pacing)
``plan.py``            who connects where; each worker's share
``run.py``             the parent: fork workers, step them through the phases
``worker.py``          a worker process: its clients and the phases
``engine.py``          the compiled engine: a Go worker process in its place
``engine/``            the Go worker (main.go: the epoll loop; tls.go: wss)
``gobuild.py``         builds the Go programs offline on first use
``client.py``          one raw WebSocket connection; the receive hot path
``receiver.py``        a worker's one reader over a private epoll
``wire.py``            RFC 6455 client side: handshake, masked frames
``dialects.py``        each protocol's auth stage and message shapes
``tokens.py``          JWTs for GradAgenda and wschat
``histogram.py``       latency histograms and percentiles
``process.py``         /proc CPU and RSS readings, pinning, fd limit
``report.py``          the result dict (``--json``) and the summary table
``progress.py``        the live progress line
``plot.py``            ``--plot FILE.png``
=====================  ======================================================

Linux only (epoll, /proc, prctl), as the load test always was.
"""
