"""Start, pin, probe, meter and stop the servers under test.

The code lives in ``prism.benchmark`` (``procstat``, ``servers``,
``grpc_client``, ``metrics_text``), shared with ``prism bench``; this module
re-exports it under the names the scripts here import.
"""

from __future__ import annotations

from prism.benchmark.grpc_client import (
    GET_ITEMS,
    PUT_ITEMS,
    GrpcAccess,
    channel_options,
    fetch_checked_answer,
    open_channel,
    seed,
)
from prism.benchmark.metrics_text import Sample, metric_sum, parse_metrics
from prism.benchmark.procstat import (
    CLK_TCK,
    ServerFailed,
    cpu_counters,
    cpu_list,
    pin_benchmark,
    process_role,
    process_tree,
    ticks_to_us,
)
from prism.benchmark.servers import (
    PrismServer,
    ServerProcess,
    free_port,
    make_prism,
    prism_command,
)

__all__ = [
    "CLK_TCK",
    "GET_ITEMS",
    "PUT_ITEMS",
    "GrpcAccess",
    "PrismServer",
    "Sample",
    "ServerFailed",
    "ServerProcess",
    "channel_options",
    "cpu_counters",
    "cpu_list",
    "fetch_checked_answer",
    "free_port",
    "make_prism",
    "metric_sum",
    "open_channel",
    "parse_metrics",
    "pin_benchmark",
    "prism_command",
    "process_role",
    "process_tree",
    "seed",
    "ticks_to_us",
]
