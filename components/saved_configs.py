"""Configs saved by earlier versions (a registered bundle's `config.json`) in today's form, so a model
registered then still loads and retrains."""

from __future__ import annotations

import json
from typing import Any

# where fields of configs saved before they moved now live
MOVED_FIELDS = {"download.url_list": "data.source", "download.url_col": "data.url_col",
                "download.caption_col": "data.caption_col"}
# fields renamed in place: (section, old name) -> new name ("holdout" now means the held-out split alone)
RENAMED_FIELDS = {("corpus", "holdout"): "zero_shot_pairs"}
# the shapes corpus's values that configs saved before `None` meant "by source" held for every source
SOURCE_DEFAULTS = {("download", "allow_file_urls"): True, ("filter", "drop_exact_duplicates"): False}


def upgrade(config: dict[str, Any]) -> dict[str, Any]:
    """A saved whole config (a bundle's `config.json`) in today's form: renamed and moved fields under
    their names, the shapes corpus's defaults that older configs spelled out put back to None (by source), a dVAE
    saved before `dvae.quantizer` existed named for what it is (gumbel), and a vq dVAE saved with a
    weight average (which vq now refuses) fine-tuned without one."""
    tree = json.loads(json.dumps(config))
    for (section, old), new in RENAMED_FIELDS.items():
        if old in tree.get(section, {}):
            tree[section][new] = tree[section].pop(old)
    if "dvae" in tree and "quantizer" not in tree["dvae"]:  # saved before the vq kind: the paper's dVAE
        tree["dvae"]["quantizer"] = "gumbel"
    dvae = tree.get("dvae", {})
    if dvae.get("quantizer") == "vq" and dvae.get("optim", {}).get("ema_decay", 0) > 0:
        dvae["optim"]["ema_decay"] = 0.0  # saved before vq refused a weight average (fine-tuning trains without)
    download = tree.get("download", {})
    if "url_list" not in download:
        return tree
    for old, new in MOVED_FIELDS.items():
        (section, field), (new_section, new_field) = old.split("."), new.split(".")
        if field in tree.get(section, {}):
            tree.setdefault(new_section, {})[new_field] = tree[section].pop(field)
    for (section, field), shapes_value in SOURCE_DEFAULTS.items():
        if tree.get(section, {}).get(field) == shapes_value:
            tree[section][field] = None
    return tree
