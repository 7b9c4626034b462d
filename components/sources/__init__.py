"""Your own data: the kinds of source the pipeline reads, and bringing a local one into a download folder."""

from .ingest import run
from .kinds import LOCAL_KINDS, Item, items, source_kind

__all__ = ["LOCAL_KINDS", "Item", "items", "run", "source_kind"]
