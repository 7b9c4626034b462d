"""Stage cache keys: derived from the call a stage makes, its code from the component's imports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from dalle_pipeline.components.config import FilterConfig
from dalle_pipeline.components.filter.run import run as filter_run
from dalle_pipeline.components.stage_cache import RECORD, StageCache, StageRecord, bind_call
from dalle_pipeline.components.stage_code import stage_code

P = "dalle_pipeline.components."


@dataclass(frozen=True)
class Out:
    curated_dir: str


def finished(cache: StageCache, stage: str, folder: str, key: str) -> Path:
    """A stage folder under the cache's root committed with `key`."""
    path = cache.root / stage / folder
    path.mkdir(parents=True)
    cache.commit(StageRecord(stage, key, path, Out(str(path)), {}, "run-id", 1.0))
    return path


def key(cache: StageCache, *args, content: bool = True, **kwargs) -> str:
    return cache.call_key("filter", filter_run, bind_call(filter_run, args, kwargs).arguments, content)


def test_a_key_follows_every_argument_passed_and_the_key_of_the_stage_an_input_lies_in(tmp_path):
    cache = StageCache(tmp_path / "stages")
    source = finished(cache, "download", "folder-a", "download-key-1")
    base = key(cache, FilterConfig(), str(source))
    assert base == key(cache, FilterConfig(), source)  # a path or its string: the same argument
    assert key(cache, FilterConfig(min_image_size=20), str(source)) != base
    # the download folder grew (a longer URL list): same folder, another record key, another filter key
    cache.commit(StageRecord("download", "download-key-2", source, Out(str(source)), {}, "run-id", 1.0))
    grown = key(cache, FilterConfig(), str(source))
    assert grown != base
    # ... but the filter's folder is named by where its input lies, so it keeps accumulating there
    assert key(cache, FilterConfig(), str(source), content=False) == key(
        StageCache(cache.root), FilterConfig(), str(source), content=False)
    # the same stages under another root: the same keys
    moved = StageCache(tmp_path / "elsewhere" / "stages")
    finished(moved, "download", "folder-a", "download-key-2")
    assert key(moved, FilterConfig(), str(moved.root / "download" / "folder-a")) == grown
    # ... and an accumulating stage's folder is named the same there: a root's cache on another machine (an
    # object store's) finds the folder the store holds
    assert key(moved, FilterConfig(), str(moved.root / "download" / "folder-a"), content=False) == key(
        cache, FilterConfig(), str(source), content=False)


def test_a_file_outside_the_root_is_keyed_by_its_content(tmp_path):
    cache = StageCache(tmp_path / "stages")
    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption\nhttp://a/1.png,one\n")
    first = cache.stage_value(str(url_list))
    url_list.write_text("url,caption\nhttp://a/1.png,one\nhttp://a/2.png,two\n")
    assert cache.stage_value(str(url_list)) != first and cache.stage_value(str(url_list), content=False) == str(url_list)


def test_a_folder_outside_the_root_is_keyed_by_its_listing_whatever_order_it_is_walked_in(tmp_path, monkeypatch):
    """A folder source's key changes when a file is added, removed, renamed or rewritten, and not otherwise; the
    listing is walked, not sorted into a list, so the order the file system gives changes nothing."""
    import os

    cache = StageCache(tmp_path / "stages")
    source = tmp_path / "pictures"
    (source / "sub").mkdir(parents=True)
    for name in ("a.png", "a.txt", "sub/b.png", ".hidden"):
        (source / name).write_bytes(b"x")
    os.symlink(tmp_path / "nowhere", source / "broken.png")  # no file there: not in the listing
    first = cache.stage_value(str(source))
    assert first.startswith(f"{source}#listing=") and cache.stage_value(str(source)) == first
    walk = os.walk
    monkeypatch.setattr(os, "walk", lambda top: ((d, s, sorted(n, reverse=True))
                                                 for d, s, n in reversed(list(walk(top)))))
    assert cache.stage_value(str(source)) == first
    seen = {first}
    for change in (lambda: (source / "c.png").write_bytes(b"y"), lambda: (source / "c.png").unlink(),
                   lambda: (source / "a.txt").write_bytes(b"longer"),
                   lambda: (source / "sub/b.png").rename(source / "b.png"),
                   lambda: os.utime(source / "a.png", ns=(1, 1))):
        change()
        seen.add(cache.stage_value(str(source)))
    assert len(seen) == 5  # c.png added then removed: the first listing again


def test_an_argument_with_no_stage_key_is_refused_by_type(tmp_path):
    with pytest.raises(TypeError, match="of type object has no stage key"):
        StageCache(tmp_path).stage_value({"model": object()})


def test_the_code_of_a_stage_is_its_module_and_everything_it_imports_from_the_package():
    tokenize = stage_code(P + "tokenize_corpus.run")
    assert {P + "tokenize_corpus.run", P + "token_parquet", P + "dvae.model", P + "images", P + "storage",
            P + "cluster", P + "text.tokenizer"} <= set(tokenize)
    assert P + "dvae.train" not in tokenize  # tokenization runs the dVAE's model, not its trainer
    assert P + "config" not in tokenize and P + "tracking" not in tokenize  # their effect is in the values
    # imports inside functions count too: sampling loads each model where it needs it
    assert {P + "prior.model", P + "prior.attention", P + "clip.model"} <= set(stage_code(P + "sample.run"))


def test_only_a_stage_committed_with_the_same_key_is_found(tmp_path):
    cache = StageCache(tmp_path)
    folder = cache.folder("filter", "k1")
    folder.mkdir(parents=True)
    (folder / "part.partial").write_text("a crashed run's work")
    assert cache.lookup(folder, "k1", Out) is None
    record = StageRecord("filter", "k1", folder, Out("x"), {"kept": 3.0}, "run-id", 2.0)
    cache.commit(record)
    assert (folder / RECORD).is_file()
    assert cache.lookup(folder, "k1", Out) == record
    assert cache.lookup(folder, "another key", Out) is None  # an accumulating folder, since grown by other inputs


def test_a_function_without_an_out_dir_is_no_stage():
    def helper(cfg):
        return cfg

    with pytest.raises(TypeError, match="takes no 'out_dir'"):
        bind_call(helper, (1,), {})
