from pathlib import Path

from streams.settings import WorkerSettings

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_documents_every_setting():
    for field in WorkerSettings.model_fields.values():  # the library's settings and the worker's
        name = field.validation_alias.choices[0]
        assert f"| `{name}` |" in README, f"{name} is missing from the README's configuration table"


def test_the_project_explains_itself():
    """Nothing points outside the repository (the shared/ folder of the workplace is not part of it)."""
    root = Path(__file__).parent.parent
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yml", ".yaml", ".toml", ".sql")
             and ".venv" not in p.parts and ".git" not in p.parts and p.name != "test_docs.py"]
    assert [str(p) for p in files if "../shared" in p.read_text(errors="ignore")] == []
