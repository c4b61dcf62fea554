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


def test_the_readme_fits_and_every_link_leads_somewhere():
    """A newcomer's page: short, and every relative link in it and in docs/ names a file that is there."""
    import re

    assert len(README.splitlines()) <= 160
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}"
    for name in ("architecture", "operations", "noetl", "configuration", "reliability", "benchmarks"):
        assert f"docs/{name}.md" in README
