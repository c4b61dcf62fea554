"""The stream worker's Prometheus metrics (events, skipped declarations, dead letters, invalidations); the
library's are in keychain/metrics.py. Every label comes from a closed set: never an input's own words."""

from prometheus_client import Counter, Gauge, Histogram

from keychain.metrics import LATENCY_BUCKETS, LEAD_BUCKETS

EVENTS = Counter("keychain_events_total", "Execution events processed, by kind (start, finish, ignored)", ["kind"])
EVENTS_OF_KIND = {kind: EVENTS.labels(kind) for kind in ("start", "finish", "ignored")}  # bound once: one per event
SKIPPED_DECLARATIONS = Counter(
    "keychain_skipped_declarations_total", "Credential declarations of started executions not warmed, by reason",
    ["reason"],
)
DEAD_LETTERS = Counter("keychain_dead_letters_total", "Messages sent to the dead-letter topic, by reason", ["reason"])
TARGET_FAILURES = Counter(
    "keychain_target_failures_total",
    "Invalidations a worker target did not apply in its own store yet, by target and reason (closed set: "
    "streams/deferred.py REASONS); each is tried again from the outbox", ["target", "reason"])
TARGET_INVALIDATIONS_WAITING = Gauge(
    "keychain_target_invalidations_waiting",
    "Invalidations recorded for a worker target that it has not applied yet (the outbox)", ["target"])
TARGET_INVALIDATIONS_REFUSED = Gauge(
    "keychain_target_invalidations_refused",
    "Invalidations a worker target refused for good (an expired token, a missing grant): its rows still serve what "
    "they stopped: page on a value above 0", ["target"])
BATCHES_HELD_FOR_DEAD_LETTERS = Gauge(
    "keychain_batches_held_for_dead_letters",
    "Batches not acknowledged because the broker has not taken their dead letters yet (sent again with backoff): "
    "page on a value above 0 that lasts")
DEAD_LETTERS_NOT_SENT = Counter(
    "keychain_dead_letters_not_sent_total", "Dead letters the broker did not accept (logged with their source offset)"
)
INVALIDATIONS = Counter(
    "keychain_invalidations_total",
    "Invalidations applied, by cause (a Secret Manager event type, operator, reconcile)", ["cause"]
)
NOTICES_NOT_FORWARDED = Counter(
    "keychain_notices_not_forwarded_total",
    "Secret Manager notifications acknowledged without invalidating anything, by reason (topic_configured, "
    "unknown_event_type: a type Google added that this bridge does not know yet)", ["reason"],
)
INVALIDATED_ROWS = Counter("keychain_invalidated_rows_total", "Rows that stopped being served after a notice")
INVALIDATION_LAG_SECONDS = Histogram(
    "keychain_invalidation_lag_seconds", "From Secret Manager's event time to the rows no longer being served",
    buckets=LEAD_BUCKETS,
)
GLOBAL_REPOINTS = Counter(
    "keychain_global_repoints_total", "Warms that wrote a global name over a row holding another secret"
)
WARM_STEP_SECONDS = Histogram(
    "keychain_warm_step_seconds",
    "Time of each step of warming a batch: plan (parse the events, read the catalog, resolve), check (which rows are "
    "already warm), fetch (Secret Manager rounds, shared), write (the durable statement)", ["step"],
    buckets=LATENCY_BUCKETS,
)
WARM_STEP = {step: WARM_STEP_SECONDS.labels(step) for step in ("plan", "check", "fetch", "write")}

# --- the noetl target (streams/targets/noetl/) ---------------------------------------------------------------------
NOETL_RESIDENCY_VIOLATIONS = Counter(
    "keychain_noetl_residency_violations_total",
    "Aliases warmed for NoETL's server under `residency: advisory` whose region is not the server's (its server "
    "resolves them too, and logs the violation)",
)
NOETL_SKIPPED_ALIASES = Counter(
    "keychain_noetl_skipped_aliases_total",
    "Keychain aliases of started executions not warmed into NoETL's keychain, by reason (closed set: "
    "streams/targets/noetl/aliases.py)", ["reason"],
)
NOETL_ROWS_SEEN = Counter(
    "keychain_noetl_rows_total",
    "Rows leaving NoETL's keychain (purged or swept), by outcome: warmed_read (the warmer wrote it and NoETL's server "
    "then read it: a first use served from the cache), warmed_unread (nobody read it), server_written (NoETL's server "
    "wrote it itself, under a key the warmer did not warm: a miss the warmer could not prevent)", ["outcome"],
)
NOETL_ROWS = {outcome: NOETL_ROWS_SEEN.labels(outcome) for outcome in ("warmed_read", "warmed_unread",
                                                                      "server_written")}
NOETL_CALLS_SAVED = Counter(
    "keychain_noetl_calls_saved_total",
    "Secret Manager calls NoETL's server did not make: the values held by warmed rows it read (one call per value on "
    "its own first use)",
)
NOETL_NOT_SEALED = Counter(
    "keychain_noetl_rows_not_sealed_total", "Rows not warmed into NoETL's keychain because no data key could be wrapped"
)
