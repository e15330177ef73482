"""``prism bench``: load a Prism with a scenario, measure it, write results and a report.

- ``scenario``: the scenario file (TOML, decoded strictly);
- ``procstat``, ``servers``, ``grpc_client``, ``metrics_text``: start, pin,
  meter and stop the server under test (shared with the scripts in ``bench/``);
- ``workload``, ``frames``, ``loadgen``, ``loadpool``: the built-in load
  generator; ``h2load``: h2load, for steps one fixed request can express;
- ``runner``: the steps of a run; ``results``: ``results.json`` (its schema:
  docs/bench-results.md); ``report``: ``report.html`` and the PNG plots.
"""
