"""A config field carries its help text: `arg(default, help)` writes it, `field_help` reads it
back for `gptforge train --help`."""

from __future__ import annotations

from dataclasses import field, fields


def arg(default, help: str):
    """A config field with its help text (shown by `gptforge train --help`)."""
    return field(default=default, metadata={"help": help})


def field_help(section_cls) -> dict[str, str]:
    """Field name -> its help (the `arg(..., help)` metadata): the CLI help of `gptforge train`."""
    return {f.name: f.metadata.get("help", "") for f in fields(section_cls)}
