"""The configuration reference (docs/configuration.md), made from the settings themselves: each setting's one
description lives in keychain/settings.py or streams/settings.py, and this page is generated from them
(`python -m devtools configuration > docs/configuration.md`; tests/test_docs.py checks it is current)."""

from __future__ import annotations

from pydantic import SecretStr

from keychain.settings import Settings
from streams.settings import WorkerSettings

HEADER = """# Configuration

Every setting is an environment variable, read once at start (pydantic-settings). A `KEYCHAIN_*` variable that is not
a setting is warned about, with the closest name. This page is generated from the settings' own descriptions: run
`python -m devtools configuration > docs/configuration.md` after changing one.
"""


def _default(value: object) -> str:
    if value is None or (isinstance(value, SecretStr) and not value.get_secret_value()):
        return "(none)"
    if isinstance(value, SecretStr):
        return "(set)"
    return f"`{value}`"


def _table(fields: dict) -> list[str]:
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for field in fields.values():
        name = field.validation_alias.choices[0]
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | {_default(field.default)} | {description} |")
    return lines


def reference() -> str:
    library = Settings.model_fields
    worker = {name: field for name, field in WorkerSettings.model_fields.items() if name not in library}
    parts = [HEADER, "## The library (`keychain`: what a worker that reads the keychain needs)", "",
             *_table(library), "", "## The stream worker (`python -m streams worker`: the library's, and these)", "",
             *_table(worker)]
    return "\n".join(parts) + "\n"


def main() -> None:
    print(reference(), end="")
