import pytest

from dalle_pipeline.components.config import TokenizerConfig
from dalle_pipeline.components.text.tokenizer import TextTokenizer, run, train_and_save

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center",
            "a small green triangle at the bottom"] * 20


def test_same_captions_give_the_same_tokenizer(tmp_path):
    cfg = TokenizerConfig(vocab_size=300)
    path_a, hash_a = train_and_save(cfg, CAPTIONS, tmp_path / "a")
    path_b, hash_b = train_and_save(cfg, CAPTIONS, tmp_path / "b")
    assert hash_a == hash_b
    assert path_a.name == "tokenizer.json"


def test_round_trip_lowercases_and_cuts_to_text_len(tmp_path):
    path, _ = train_and_save(TokenizerConfig(vocab_size=300), CAPTIONS, tmp_path)
    tokenizer = TextTokenizer.load(path, text_len=24)
    ids = tokenizer.encode(["A Small RED circle in the top left"])[0]
    assert tokenizer.decode(ids) == "a small red circle in the top left"
    assert len(tokenizer.encode(["red " * 100])[0]) == 24
    # byte-level: unseen characters still encode, nothing is out of vocabulary
    assert tokenizer.decode(tokenizer.encode(["zébra ☂"])[0]) == "zébra ☂"


def test_empty_caption_list_is_refused(tmp_path):
    for empty in ([], iter([])):
        with pytest.raises(ValueError, match="empty caption list"):
            train_and_save(TokenizerConfig(), empty, tmp_path)


def test_bpe_dropout_varies_the_segmentation_not_the_text_and_never_touches_the_saved_tokenizer(tmp_path):
    path, digest = train_and_save(TokenizerConfig(vocab_size=300), CAPTIONS, tmp_path)
    plain = TextTokenizer.load(path, text_len=64)
    caption = "a small red circle in the top left"
    dropping = plain.with_dropout(0.5)
    segmentations = {tuple(dropping.encode([caption])[0]) for _ in range(20)}
    assert len(segmentations) > 1
    assert all(plain.decode(ids) == caption for ids in segmentations)
    assert all(len(ids) >= len(plain.encode([caption])[0]) for ids in segmentations)  # merges are only skipped
    assert {tuple(plain.encode([caption])[0]) for _ in range(5)} == {tuple(plain.encode([caption])[0])}
    from dalle_pipeline.components.storage import file_sha256

    assert file_sha256(path) == digest


def test_the_stage_reports_caption_lengths_and_says_when_text_len_cuts_them(tmp_path, capsys):
    from dalle_pipeline.components.shards import Sample, write_shard

    long = "a small red circle in the top left next to a large blue square in the center of a green field"
    captions = CAPTIONS + [long] * 20  # a quarter of the captions
    write_shard(tmp_path / "curated" / "00000.tar",
                [Sample(f"{index:05d}", b"not read here", "png", caption) for index, caption in enumerate(captions)])
    cfg = TokenizerConfig(vocab_size=400, text_len=12)
    result = run(cfg, tmp_path / "curated", tmp_path / "tok")
    path, lengths = result.tokenizer_path, result.metrics
    tokenizer = TextTokenizer.load(path, text_len=1000)
    long_tokens = len(tokenizer.encode([long])[0])
    assert long_tokens > 12 >= max(len(ids) for ids in tokenizer.encode(CAPTIONS))
    assert lengths["captions_cut"] == 0.25
    assert lengths["caption_tokens_max"] == long_tokens
    out = capsys.readouterr().out
    assert "25% of the captions are longer than tokenizer.text_len=12" in out
    assert f"--set tokenizer.text_len={long_tokens}" in out  # the 95th percentile: the long ones

    fitting = run(cfg.model_copy(update={"text_len": long_tokens}), tmp_path / "curated", tmp_path / "tok2")
    assert fitting.metrics["captions_cut"] == 0.0
    assert "longer than" not in capsys.readouterr().out


def test_a_stream_of_captions_trains_the_same_tokenizer_file_as_the_list(tmp_path):
    cfg = TokenizerConfig(vocab_size=300)
    listed, _ = train_and_save(cfg, CAPTIONS, tmp_path / "list")
    streamed, _ = train_and_save(cfg, (caption for caption in CAPTIONS), tmp_path / "stream")
    assert streamed.read_bytes() == listed.read_bytes()


def test_the_stage_reads_no_image_and_matches_training_on_the_caption_list(curated_shards, tmp_path, monkeypatch):
    import numpy as np

    from dalle_pipeline.components import shards
    from dalle_pipeline.components.text import tokenizer as text_tokenizer

    captions = [sample.caption for sample in shards.iter_samples(curated_shards)]
    listed, digest = train_and_save(TokenizerConfig(vocab_size=400), captions, tmp_path / "list")
    lengths = np.array([len(ids) for ids in TextTokenizer.load(listed, text_len=10_000).encode(captions)])
    text_len = int(np.median(lengths))  # cuts some captions, not all
    read_members = []
    real_tar_members = shards.tar_members
    monkeypatch.setattr(shards, "tar_members", lambda *args, **kwargs: (
        read_members.append(member[0]) or member for member in real_tar_members(*args, **kwargs)))
    monkeypatch.setattr(text_tokenizer, "ENCODE_BATCH", 7)  # several batches, the last one short
    result = run(TokenizerConfig(vocab_size=400, text_len=text_len), curated_shards, tmp_path / "stage")
    assert result.tokenizer_path.read_bytes() == listed.read_bytes() and result.tokenizer_hash == digest
    assert result.metrics == {"caption_tokens_mean": float(lengths.mean()),
                              "caption_tokens_p95": float(np.percentile(lengths, 95)),
                              "caption_tokens_max": float(lengths.max()),
                              "captions_cut": float((lengths > text_len).mean())}
    assert 0 < result.metrics["captions_cut"] < 1
    assert read_members and not [name for name in read_members if not name.endswith((".txt", ".json"))]


def test_the_95th_percentile_from_the_histogram_is_numpys_to_the_bit():
    import numpy as np

    from dalle_pipeline.components.text.tokenizer import _percentile

    rng = np.random.default_rng(0)
    for count in [1, 2, 3, 19, 20, 21, 101, 997, 4096, 12_345]:
        for high in (1, 5, 80):
            lengths = rng.integers(0, high, count)
            assert _percentile(np.bincount(lengths), 95) == float(np.percentile(lengths, 95)), (count, high)
