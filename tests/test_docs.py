from pathlib import Path

from keychain.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_documents_every_setting():
    for field in Settings.model_fields.values():
        name = field.validation_alias.choices[0]
        assert f"| `{name}` |" in README, f"{name} is missing from the README's configuration table"
