"""Which column of a user's table holds what: the configured name, else a name the common exports use.

LAION's URL lists name their columns `URL` and `TEXT`, Hugging Face `datasets` exports `image` and
`text`, prompt sets `prompt`. Where the configured column (`data.url_col`, `data.caption_col`) is at
its default and absent, the first of the known other names present is used, and the choice is
logged; otherwise the error names the configured column and the table's string columns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pyarrow as pa

LOG = logging.getLogger("dalle_pipeline.data")
ALIASES = {
    "caption": ("text", "TEXT", "prompt", "Caption"),
    "url": ("URL", "image_url"),
}


def is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def string_columns(schema: pa.Schema) -> list[str]:
    """The names of a table's text columns: where a caption or a URL can be."""
    return [field.name for field in schema if is_text(field.type)]


def pick(names: Sequence[str], configured: str, role: str, where: object,
         string_columns: Sequence[str] | None = None, log: bool = True) -> str:
    """The column of `names` holding the `role` ('caption' or 'url'); ValueError naming what there is. A choice
    of another name is logged unless `log` is False (the caller said it already)."""
    if configured in names:
        return configured
    if configured == role:  # the default name: the common exports' names count too
        found = next((alias for alias in ALIASES.get(role, ()) if alias in names), None)
        if found is not None:
            if log:
                LOG.warning("%s: no column %r; reading the %ss from %r (data.%s_col)", where, configured, role, found,
                            role)
            return found
    candidates = list(string_columns if string_columns is not None else names)
    raise ValueError(f"{where}: no {role} column {configured!r} (data.{role}_col); its "
                     f"{'string ' if string_columns is not None else ''}columns are {candidates}: set "
                     f"data.{role}_col to the one that holds the {role}s")
