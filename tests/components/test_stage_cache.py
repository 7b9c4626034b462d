"""Stage cache keys: what changes a key, what does not, and the record written last."""

from __future__ import annotations

import pytest

from dalle_pipeline.components.stage_cache import RECORD, StageCache, code_version


def test_a_key_changes_with_config_inputs_and_code_and_nothing_else(tmp_path):
    cache = StageCache(tmp_path)
    base = cache.key("prior", {"layers": 2, "seed": 0}, {"tokenize-corpus": "abc"}, ("prior", "training"))
    assert base == StageCache(tmp_path / "elsewhere").key("prior", {"seed": 0, "layers": 2}, {"tokenize-corpus": "abc"},
                                                          ("training", "prior"))
    changed = [
        cache.key("prior", {"layers": 3, "seed": 0}, {"tokenize-corpus": "abc"}, ("prior", "training")),
        cache.key("prior", {"layers": 2, "seed": 0}, {"tokenize-corpus": "abd"}, ("prior", "training")),
        cache.key("prior", {"layers": 2, "seed": 0}, {"tokenize-corpus": "abc"}, ("prior",)),
        cache.key("clip", {"layers": 2, "seed": 0}, {"tokenize-corpus": "abc"}, ("prior", "training")),
    ]
    assert len({base, *changed}) == 5


def test_code_version_covers_the_named_modules():
    assert code_version(["prior"]) != code_version(["dvae"])
    assert code_version(["prior", "dvae"]) == code_version(["dvae", "prior", "prior"])
    with pytest.raises(FileNotFoundError, match="no component module 'nonexistent'"):
        code_version(["nonexistent"])


def test_only_a_stage_committed_with_the_same_key_is_found(tmp_path):
    cache = StageCache(tmp_path)
    key = cache.key("dvae", {}, {}, ("dvae",))
    folder = cache.folder("dvae", key)
    folder.mkdir(parents=True)
    (folder / "checkpoint.partial").write_text("a crashed run's work")
    assert cache.lookup(folder, key) is None
    record = cache.commit(folder, "dvae", key, {"outputs": {"checkpoint_dir": "x"}, "metrics": {"psnr": 20.0}})
    assert cache.lookup(folder, key) == record == {"stage": "dvae", "key": key, "outputs": {"checkpoint_dir": "x"},
                                                   "metrics": {"psnr": 20.0}}
    assert (folder / RECORD).is_file()
    assert cache.lookup(folder, "another key") is None  # an accumulating folder, since grown by other inputs
