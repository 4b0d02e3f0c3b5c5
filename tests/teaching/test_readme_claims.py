"""The README's claims table is the generated one (docs/results/claims.md, written by
`python -m apo_toy.run --preset claims`), not prose written beside it."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _verdict_table(text: str) -> list[str]:
    section = text.split("## Verdicts", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def test_readme_quotes_the_generated_verdict_table():
    generated = _verdict_table((ROOT / "docs/results/claims.md").read_text())
    assert len(generated) > 5  # header, rule and one row per (claim, arm, rule)
    readme = (ROOT / "README.md").read_text().splitlines()
    missing = [row for row in generated if row not in readme]
    assert not missing, f"README.md lacks rows of docs/results/claims.md (rerun or re-copy):\n{missing[:3]}"


def test_readme_names_the_command_and_settings_of_the_table():
    readme = (ROOT / "README.md").read_text()
    generated = (ROOT / "docs/results/claims.md").read_text()
    assert "python -m apo_toy.run --preset claims" in readme
    settings = generated.split("Settings: ", 1)[1].split("\n", 1)[0]
    assert settings.split(" = ")[1].split(",")[0].strip() in readme  # the settings legend is quoted too
