"""The README is the contract with new users: its quick start and its settings table must stay true."""

from __future__ import annotations

import re
from pathlib import Path

from imagesmith.config import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"`IMAGESMITH_([A-Z0-9_]+)`", README))
    missing = [name for name in Settings.model_fields if name.upper() not in documented]
    assert not missing, f"settings missing from the README's table: {missing}"


def test_quick_start_has_exactly_the_two_commands() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick_start.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
