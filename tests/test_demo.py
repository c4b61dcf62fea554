"""The README's first command: the demo on embedded defaults, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.services  # starts its own services
ROOT = Path(__file__).parent.parent  # as `make demo` runs it


def test_demo_runs_end_to_end_and_reports():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KEYCHAIN_", "SECRET_MANAGER_", "KAFKA_", "PUBSUB_"))}
    result = subprocess.run([sys.executable, "-m", "devtools", "demo"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("[5/7]") for line in lines)  # progress is shown while it runs
    summary = json.loads(lines[-1])
    assert summary["first_use_reads"] == 3 and summary["first_use_hits"] == 3  # warmed before first use
    assert summary["regional_first_use_hit"] and summary["regional_kept_through_global_rotation"]
    assert summary["dead_letters"] == 0  # NoETL's own records: start, steps, finish; none is a dead letter
    assert summary["stale_reads_after_rotation"] == 0 and summary["rotation_lag_ms"] > 0
    assert summary["purged_rows"] == 2 and summary["swept_rows"] == 1 and summary["rows_after"] == 0
    assert summary["sm_calls"] >= 2  # the warm, and the refresh after the rotation
    # NoETL's own server, reading its own keychain: every first use a hit, the rotation reached it, rows cleaned up
    assert summary["noetl_first_use_reads"] == 3 and summary["noetl_first_use_hits"] == 3
    assert summary["noetl_server_sm_calls"] == 0 and summary["noetl_stale_reads_after_rotation"] == 0
    assert summary["noetl_rows_purged"] == 2 and summary["noetl_rows_swept"] == 1
