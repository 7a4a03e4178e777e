"""Regenerate the field table of docs/configuration.md from LOOPConfig's help texts.

    python docs/make_config_reference.py          # rewrite the table
    python docs/make_config_reference.py --check  # exit 1 if the table is stale (run by the tests)
"""

import sys
from dataclasses import MISSING, fields
from pathlib import Path

from loop_trl.config import LOOPConfig

DOC = Path(__file__).with_name("configuration.md")
BEGIN, END = "<!-- fields:begin -->", "<!-- fields:end -->"


def table() -> str:
    rows = ["| field | type | default | what it does |", "| --- | --- | --- | --- |"]
    for f in fields(LOOPConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{f.type}` | `{default!r}` | {help_text} |")
    return "\n".join(rows)


def render(text: str) -> str:
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    current = DOC.read_text()
    fresh = render(current)
    if "--check" in sys.argv:
        sys.exit(0 if fresh == current else "docs/configuration.md is stale: run python docs/make_config_reference.py")
    DOC.write_text(fresh)
