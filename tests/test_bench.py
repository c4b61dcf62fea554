"""The benchmarks keep working (quick mode) and report what they promise. Their speed is not asserted here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = [pytest.mark.services, pytest.mark.bench]  # `make bench-quick`; they start their own services

ROOT = Path(__file__).parent.parent
KEYS = {
    "hit_latency": {"get_p50_ms", "get_p99_ms", "select1_p50_ms", "sm_p50_ms", "ratio_vs_select1", "speedup_vs_sm",
                    "get_per_s", "select1_per_s", "ratio_vs_select1_min", "ratio_vs_select1_max",
                    "update_floor_vs_select1", "statement_floor_vs_select1"},
    "warm": {"events_per_s", "ready_p50_ms", "ready_p99_ms", "sm_calls_per_event", "first_use_hit_ratio",
             "regional_first_use_hit_ratio",
             "worker_rss_mb", "catalog_events_per_s", "catalog_first_use_hit_ratio", "catalog_sm_calls_per_event",
             "catalog_vs_inline_events_per_s", "ready_p99_minus_sm_p99_ms", "worker_cpu_ms_per_event",
             "worker_cpu_share_of_span", "steady_ready_p50_ms", "steady_ready_p99_ms", "steady_ready_p99_minus_sm_p99_ms",
             "ignored_events_per_s", "ignored_worker_cpu_ms_per_event", "noetl_first_read_hit_ratio",
             "noetl_alone_first_read_hit_ratio", "noetl_sm_calls_per_execution", "noetl_alone_sm_calls_per_execution",
             "noetl_sm_calls_vs_alone", "aiokafka_floor_ms_per_record", "ignored_vs_aiokafka_floor",
             "idle_worker_cpu_s_per_s", "idle_worker_cpu_s_per_s_at_20ms",
             *(f"{key}_{delay}{suffix}" for delay in (0, 50, 100, 250, 500, 1000)
               for key, suffix in (("first_read", "_ms_p50"), ("first_read", "_ms_p99"), ("extra_sm_calls", "")))},
    "invalidate": {"lag_p50_ms", "lag_p99_ms", "pubsub_p50_ms", "pubsub_p99_ms"},
    "sweep": {"rows_per_s", "reader_p99_idle_ms", "reader_p99_sweep_ms"},
    "replicas": {"sm_calls_1", "sm_calls_2", "sm_calls_3", "events_per_s_1", "events_per_s_2", "events_per_s_3",
                 "machine_busy_1", "machine_busy_3", "takeover_s"},
    "scale": {"rows", "get_p50_ms_small", "get_p50_ms_large", "reconcile_round_ms_small", "reconcile_round_ms_large",
              "sweep_rows_per_s_large"},
}


def run_quick(name: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KEYCHAIN_", "SECRET_MANAGER_", "KAFKA_", "PUBSUB_"))}
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["hit_latency", "warm", "sweep", "replicas", "scale"])
def test_benchmark_reports_its_figures(name):
    figures = run_quick(name)
    assert KEYS[name] <= set(figures), KEYS[name] - set(figures)
    assert all(isinstance(figures[k], (int, float)) for k in KEYS[name])
    if name == "warm":
        for prefix in ("", "catalog_"):  # each secret of the pool about once, inline playbooks or NoETL's catalog
            assert figures[f"{prefix}sm_calls_per_event"] <= 20 / figures["events"] * 2
        # a first read racing the warm, at any delay, joins its fetch: no call of its own
        assert [figures[f"extra_sm_calls_{d}"] for d in (0, 50, 100, 250, 500, 1000)] == [0] * 6
        # NoETL's own server: alone, a call per alias field per execution; warmed, about one per secret per burst
        assert figures["noetl_alone_sm_calls_per_execution"] == 3 and figures["noetl_alone_first_read_hit_ratio"] == 0
        assert figures["noetl_sm_calls_per_execution"] <= 3 / figures["noetl_executions"] * 2
    if name == "replicas":  # one Secret Manager call per secret, however many replicas
        assert figures["sm_calls_1"] == figures["sm_calls_2"] == figures["sm_calls_3"] == 10
    if name == "scale":  # every secret held through `latest` is in the reconciliation summary
        assert figures["rows"] == 500_000 and figures["latest_held_rows_large"] >= 20
    if name == "sweep":
        assert figures["expired_rows"] == 100_000  # all swept (the benchmark checks it), readers never missed


@pytest.mark.pubsub
def test_the_soak_checks_its_history_and_finds_no_violation():
    """bench/soak --quick: 90 s of work under faults, then the checker; what it checked is not empty."""
    figures = run_quick("soak")
    assert figures["violations"] == 0, figures["violations_by_kind"]
    assert figures["executions"] > 100 and figures["hits_checked"] > 1000 and figures["notices_checked"] > 10
    assert sum(figures["faults"].values()) >= 3


@pytest.mark.pubsub
def test_invalidate_benchmark_reports_its_figures():
    figures = run_quick("invalidate")
    assert KEYS["invalidate"] <= set(figures)
    assert figures["rotations"] == 10
