"""The operations guide documents every setting the server has."""

from __future__ import annotations

from pathlib import Path

import attrs

from msgnet import ServerConfig

OPERATIONS = Path(__file__).parent.parent / "docs" / "operations.md"


def test_every_setting_has_a_row_in_the_operations_guide() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    missing = [
        field.name
        for field in attrs.fields(ServerConfig)
        if f"| `{field.name}` | `--{field.name.replace('_', '-')}` |" not in text
    ]
    assert missing == [], f"docs/operations.md lacks settings {missing}"
