import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from keychain.crypto import KeyRing


def keychain_cli(env, *args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "keychain", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def cli(cli_env):
    def call(*args, **overrides):
        return keychain_cli({**cli_env, **overrides}, *args)

    assert call("migrate").returncode == 0
    call.env = cli_env
    return call


def test_put_get_and_exit_codes(cli):
    put = cli("put", "openai", "--value", '{"token": "tok-123"}', "--execution-id", "42", "--ttl", "60")
    assert put.returncode == 0, put.stderr
    hit = cli("get", "openai", "--execution-id", "42")
    assert hit.returncode == 0 and json.loads(hit.stdout) == {"token": "tok-123"}
    miss = cli("get", "openai", "--execution-id", "43")
    assert miss.returncode == 3 and "miss" in miss.stderr and miss.stdout == ""
    assert cli("get", "openai", "--global").returncode == 3


def test_put_takes_the_value_from_stdin_or_a_file(cli, tmp_path):
    """A real secret never on the command line (the process list, the shell's history)."""
    stdin = subprocess.run([sys.executable, "-m", "keychain", "put", "from-stdin", "--value-file", "-", "--global"],
                           input='{"token": "from-stdin-123"}', env=cli.env, capture_output=True, text=True, timeout=60)
    assert stdin.returncode == 0, stdin.stderr
    path = tmp_path / "token"
    path.write_text("sk-from-a-file-456\n")  # as `echo` or a mounted secret leaves it
    assert cli("put", "from-file", "--value-file", str(path), "--raw", "--global").returncode == 0
    assert json.loads(cli("get", "from-stdin", "--global").stdout) == {"token": "from-stdin-123"}
    assert json.loads(cli("get", "from-file", "--global").stdout) == "sk-from-a-file-456"
    for args in (["--value", '"x"', "--value-file", str(path)], [], ["--value", '"x"', "--raw"],
                 ["--value-file", str(tmp_path / "missing")]):
        result = cli("put", "bad", *args, "--global")
        assert result.returncode == 2 and "Traceback" not in result.stderr, args


def test_usage_errors_exit_2(cli):
    assert cli("get", "x").returncode == 2  # no scope
    assert cli("get", "x", "--global", "--execution-id", "1").returncode == 2
    bad_json = cli("put", "x", "--value", "{not json", "--global")
    assert bad_json.returncode == 2 and "not JSON" in bad_json.stderr
    for args in (["put", "n" * 10_000, "--value", '"v"', "--global"], ["get", "n" * 10_000, "--global"],
                 ["invalidate", "--credential", "n" * 10_000], ["get", "x", "--execution-id", str(2**64)],
                 ["get", "x", "--execution-id", "0"], ["invalidate", "--execution-id", str(2**63)]):
        done = cli(*args)
        assert done.returncode == 2, args[:2]
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 4 and "Error" in done.stderr
    assert cli("invalidate").returncode == 2
    assert cli("frobnicate").returncode == 2


def test_errors_exit_1_with_a_clear_message(cli, key_spec):
    cli("put", "sealed", "--value", '"the-plaintext"', "--global")
    wrong_key = cli("get", "sealed", "--global", KEYCHAIN_KEYS=KeyRing.generate_spec("k1"))
    assert wrong_key.returncode == 1 and "failed authentication" in wrong_key.stderr
    assert "the-plaintext" not in wrong_key.stderr + wrong_key.stdout
    bad_key = cli("get", "sealed", "--global", KEYCHAIN_KEYS="k1:c2hvcnQ=")
    assert bad_key.returncode == 1 and "must be 32 bytes" in bad_key.stderr and "c2hvcnQ" not in bad_key.stderr
    unreachable = cli("stats", KEYCHAIN_DSN="postgresql://postgres:hunter2@127.0.0.1:1/postgres")
    assert unreachable.returncode == 1 and "cannot connect" in unreachable.stderr and "hunter2" not in unreachable.stderr
    bad_dsn = cli("stats", KEYCHAIN_DSN="mysql://nope")
    assert bad_dsn.returncode == 1 and "error:" in bad_dsn.stderr
    bad_setting = cli("stats", KEYCHAIN_TTL_SECONDS="soon")
    assert bad_setting.returncode == 1 and "KEYCHAIN_TTL_SECONDS" in bad_setting.stderr and "soon" not in bad_setting.stderr


def test_get_fetch_reads_through_from_several_processes_once(cli, sm, secret):
    secret_id, value = secret
    sm.delay_seconds = 0.5
    ref = f"projects/test-project/secrets/{secret_id}/versions/latest"
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: cli("get", "openai", "--execution-id", "7", "--fetch", ref), range(6)))
    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
    assert {json.loads(r.stdout) for r in results} == {value}
    assert sm.access_count(secret_id) == 1


def test_get_fetch_missing_secret_exits_1(cli, unique):
    result = cli("get", "m", "--global", "--fetch", f"projects/test-project/secrets/none-{unique}")
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr


def test_invalidate_sweep_stats_rekey(cli, key_spec):
    for i in range(3):  # execution ids are positive 64-bit integers
        assert cli("put", f"c{i}", "--value", '"secret-value"', "--execution-id", str(i + 1)).returncode == 0
    assert cli("get", "c0", "--execution-id", "1").returncode == 0
    stats = cli("stats")
    assert stats.returncode == 0 and "secret-value" not in stats.stdout
    figures = json.loads(stats.stdout)
    assert figures["rows"] == 3 and figures["hits"] == 1 and figures["rows_read_at_least_once"] == 1
    assert json.loads(cli("invalidate", "--credential", "c1").stdout) == {"invalidated": 1}
    assert cli("get", "c1", "--execution-id", "2").returncode == 3
    assert json.loads(cli("sweep").stdout) == {"swept": 0}
    rotated = f"{KeyRing.generate_spec('k2')},{key_spec}"
    assert json.loads(cli("rekey", KEYCHAIN_KEYS=rotated).stdout) == {"rekeyed": 3, "undecryptable": 0}
    assert cli("get", "c2", "--execution-id", "3", KEYCHAIN_KEYS=rotated).returncode == 0
    assert cli("keygen", "--kid", "k7").stdout.startswith("k7:")


@pytest.mark.parametrize("variable, value, message", [
    ("KEYCHAIN_KEYS", "", "KEYCHAIN_KEYS is empty"),
    ("KEYCHAIN_KEYS", "k1:c2VjcmV0LWtleS1tYXRlcmlhbA==", "must be 32 bytes"),
    ("KEYCHAIN_TTL_SECONDS", "soon", "KEYCHAIN_TTL_SECONDS"),
])
def test_worker_refuses_bad_configuration_at_start(cli_env, variable, value, message):
    result = subprocess.run([sys.executable, "-m", "streams", "worker"], env={**cli_env, variable: value},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and message in result.stderr
    assert not value or value not in result.stderr + result.stdout


def test_a_regional_secret_is_read_through_and_invalidated_from_the_cli(cli, sm, unique):
    secret_id = f"cli-regional-{unique}"
    for location in (None, "europe-west1"):
        sm.create_secret(secret_id, location=location)
        sm.add_version(secret_id, f"value-{location or 'global'}", location=location)
    regional = f"projects/test-project/locations/europe-west1/secrets/{secret_id}"
    got = cli("get", "eu", "--execution-id", "9", "--fetch", regional)
    assert got.returncode == 0 and json.loads(got.stdout) == "value-europe-west1", got.stderr
    got = cli("get", "global", "--execution-id", "9", "--fetch", f"projects/test-project/secrets/{secret_id}")
    assert got.returncode == 0 and json.loads(got.stdout) == "value-global", got.stderr
    assert sm.access_count(secret_id, location="europe-west1") == 1 and sm.access_count(secret_id) == 1
    invalidated = cli("invalidate", "--secret", regional)
    assert invalidated.returncode == 0, invalidated.stderr
    assert cli("get", "eu", "--execution-id", "9").returncode == 3  # stale: no longer served
    assert cli("get", "global", "--execution-id", "9").returncode == 0  # the global secret of that id is another
