"""Configuration typos are not silent: in code they are errors, in the environment they are warned about at start."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from keychain.settings import Settings, unknown_variables
from streams.settings import WorkerSettings


def test_unknown_fields_given_in_code_are_refused():
    with pytest.raises(ValidationError, match="ttl_secondz"):
        Settings(ttl_secondz=5)
    with pytest.raises(ValidationError, match="warm_batch_sise"):
        WorkerSettings(warm_batch_sise=5)
    assert WorkerSettings(ttl_seconds=5, warm_batch_size=7).warm_batch_size == 7


def test_unknown_variables_are_named_with_the_closest_setting():
    environ = {"KEYCHAIN_TTL_SECONDZ": "5", "KEYCHAIN_TTL_SECONDS": "5", "KEYCHAIN_EVENTS_TOPIC": "t", "PATH": "/bin",
               "KEYCHAIN_NOTHING_LIKE_IT": "1"}
    assert unknown_variables(environ, WorkerSettings) == [
        "KEYCHAIN_NOTHING_LIKE_IT is not a setting",
        "KEYCHAIN_TTL_SECONDZ is not a setting (did you mean KEYCHAIN_TTL_SECONDS?)",
    ]
    # the library alone does not know the worker's settings
    assert "KEYCHAIN_EVENTS_TOPIC is not a setting" in " ".join(unknown_variables(environ, Settings))


def test_the_worker_warns_at_start_about_a_misspelt_variable(cli_env):
    env = {**cli_env, "KEYCHAIN_WARM_BATCH_SIZ": "5", "KEYCHAIN_TTL_SECONDS": "soon"}  # and then fails on the bad value
    result = subprocess.run([sys.executable, "-m", "streams", "worker"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "KEYCHAIN_WARM_BATCH_SIZ is not a setting (did you mean KEYCHAIN_WARM_BATCH_SIZE?)" in result.stderr


def test_the_cli_warns_about_a_misspelt_variable_but_not_about_the_workers(cli_env):
    env = {**cli_env, "KEYCHAIN_TTL_SECONDZ": "5", "KEYCHAIN_EVENTS_TOPIC": "noetl.execution.events"}
    result = subprocess.run([sys.executable, "-m", "keychain", "migrate"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "warning: KEYCHAIN_TTL_SECONDZ is not a setting (did you mean KEYCHAIN_TTL_SECONDS?)" in result.stderr
    assert "KEYCHAIN_EVENTS_TOPIC" not in result.stderr  # the worker's variable, in an environment both share
