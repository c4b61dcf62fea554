"""The library's Prometheus metrics (reads, Secret Manager calls, rows written, swept, purged). Labels are outcomes
from closed sets: never credential names, never values. The stream worker's own metrics are in streams/metrics.py."""

import typing

from prometheus_client import Counter, Histogram

from .model import Outcome

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LEAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
READS = Counter(
    "keychain_reads_total",
    "Keychain reads by outcome (hit, miss, expired, stale, failed, other_source, error; direct: served from Secret "
    "Manager while the database could not be reached)",
    ["outcome"],
)
READ_OUTCOMES = {outcome: READS.labels(outcome) for outcome in typing.get_args(Outcome)}  # bound once: per read
READ_SECONDS = Histogram("keychain_read_seconds", "Time of one keychain read (one statement)", buckets=LATENCY_BUCKETS)
WARM_LEAD_SECONDS = Histogram(
    "keychain_warm_lead_seconds", "From a row being written to its first read (how early warming was)",
    buckets=LEAD_BUCKETS,
)
SECRET_MANAGER_CALLS = Counter(
    "keychain_secret_manager_calls_total", "Secret Manager accesses by outcome (OK or the gRPC code)", ["outcome"]
)
SECRET_MANAGER_SECONDS = Histogram(
    "keychain_secret_manager_seconds", "Time of one Secret Manager access attempt", buckets=LATENCY_BUCKETS
)
SECRET_MANAGER_RETRIES = Counter(
    "keychain_secret_manager_retries_total",
    "Secret Manager accesses tried again after UNAVAILABLE or DEADLINE_EXCEEDED (by the fetcher, within its caller's "
    "deadline)",
)
BUDGET_WAIT_SECONDS = Counter(
    "keychain_secret_manager_budget_wait_seconds_total",
    "Time callers waited for the shared Secret Manager call budget (SECRET_MANAGER_MAX_CALLS_PER_MINUTE)",
)
# `target`: the store the rows are in, a closed set: `keychain` (this library's table) or a worker target's name.
ROWS_WRITTEN = Counter("keychain_rows_written_total", "Rows written by warm, re-warm and read-through, by target",
                       ["target"])
SWEPT_ROWS = Counter("keychain_swept_rows_total", "Expired rows deleted by the sweep, by target", ["target"])
PURGED_ROWS = Counter("keychain_purged_rows_total", "Rows deleted because their execution finished, by target",
                      ["target"])
DATABASE_RETRIES = Counter(
    "keychain_database_retries_total",
    "Transactions and statements run again because PostgreSQL rolled them back for a concurrent one (reason: "
    "deadlock, serialization)",
    ["reason"],
)
