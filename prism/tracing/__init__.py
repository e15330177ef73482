"""Traces and the access log of calls (``[tracing]``, ``prism.config.tracing``).

Off (the default), nothing here runs on a call: the connection, the
observer and the forwarding path are wired as before, and OpenTelemetry is
never imported. On, a worker builds one ``CallTracing`` (``calls.py``) and
wires it in once: each connection's end-of-request step and answers go
through ``traced.py``'s wrappers, and the observer ends the call's span and
writes its access-log line.

- ``context.py``: what every module may import (no OpenTelemetry): the W3C
  ``traceparent`` header, the call's ``CallTrace`` in a contextvar, child
  spans (``child``) and the log filter that adds the trace id to log lines.
- ``spans.py``: the OpenTelemetry SDK side: the tracer provider, the
  OTLP/HTTP exporter on a background thread with a bounded queue.
- ``accesslog.py``: one JSON line per call.
"""
