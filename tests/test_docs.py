from pathlib import Path

from devtools.configuration import reference
from streams.settings import WorkerSettings

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_the_configuration_reference_is_made_from_the_settings_and_current():
    """docs/configuration.md is generated from the settings' own descriptions (`python -m devtools configuration`):
    each setting is described in one place, and the page says what the code says."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference(), "docs/configuration.md is stale: python -m devtools configuration > docs/configuration.md"
    for field in WorkerSettings.model_fields.values():  # the library's settings and the worker's
        assert f"| `{field.validation_alias.choices[0]}` |" in page
        assert field.description, field.validation_alias.choices[0]
    assert "docs/configuration.md" in README


def test_the_project_explains_itself():
    """Nothing points outside the repository (the shared/ folder of the workplace is not part of it)."""
    files = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yml", ".yaml", ".toml", ".sql")
             and ".venv" not in p.parts and ".git" not in p.parts and p.name != "test_docs.py"]
    assert [str(p) for p in files if "../shared" in p.read_text(errors="ignore")] == []
