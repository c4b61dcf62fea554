"""The library a NoETL worker installs (`pip install keychain-warmer`) needs nothing of the stream worker."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.services  # installs the package into a new virtualenv (a minute)

ROOT = Path(__file__).parent.parent
STREAMING = ("faust", "aiokafka", "aiohttp", "jinja2", "yaml", "google.cloud.pubsub_v1")

CHECK = f"""
import importlib.util, sys
import keychain
from keychain import Keychain, KeychainUnavailable, Scope, SecretManagerSource, Settings
from keychain.crypto import KeyRing
settings = Settings(keys=KeyRing.generate_spec("k1"), schema_name="noetl")
Keychain(settings, source=SecretManagerSource(settings))
ring = KeyRing.parse(settings.keys.get_secret_value())
identity = Scope.of(execution_id=1).identity("openai")
assert ring.open(identity, *ring.seal(identity, "v", 1), 1) == "v"
installed = [m for m in {STREAMING!r} if importlib.util.find_spec(m.split(".")[0]) and
             (m.count(".") == 0 or importlib.util.find_spec(m))]
loaded = [m for m in {STREAMING!r} if m in sys.modules]
print(installed, loaded)
assert installed == [] and loaded == [], (installed, loaded)
"""


def test_the_library_installs_and_works_without_any_streaming_dependency(tmp_path):
    source = tmp_path / "source"  # a copy: a build in the work tree would leave build/ behind for later builds
    for name in ("keychain", "streams"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)], capture_output=True,
                             text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    checked = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr[-3000:]
    cli = subprocess.run([str(venv / "bin" / "keychain"), "--help"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert cli.returncode == 0 and "migrate" in cli.stdout
