import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dalle_pipeline.components import checkpoint
from dalle_pipeline.components.config import TokenizerConfig
from dalle_pipeline.components.dvae.model import DiscreteVAE, DVAEModelConfig
from dalle_pipeline.components.dvae.model import KIND
from dalle_pipeline.components.images import to_float
from dalle_pipeline.components.shards import load_corpus
from dalle_pipeline.components.text.tokenizer import TextTokenizer
from dalle_pipeline.components.text.tokenizer import train_and_save as train_tokenizer
from dalle_pipeline.components.token_parquet import MANIFEST, read, to_tensors
from dalle_pipeline.components.tokenize_corpus.run import run


@pytest.fixture(scope="module")
def inputs(curated_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenize")
    torch.manual_seed(0)
    model_cfg = DVAEModelConfig(image_size=32, codebook_size=64, n_hid=8, num_groups=3)
    dvae_dir = checkpoint.save(root / "dvae", KIND, DiscreteVAE(model_cfg).state_dict(), model_cfg.to_dict())
    corpus = load_corpus(curated_shards, 32)
    tokenizer_path, _ = train_tokenizer(TokenizerConfig(vocab_size=300), corpus.captions, root / "tok")
    return curated_shards, dvae_dir, tokenizer_path, corpus


def test_schema_metadata_and_round_trip(inputs, tmp_path, capfd):
    curated, dvae_dir, tokenizer_path, corpus = inputs
    result = run(curated, dvae_dir, tokenizer_path, tmp_path / "tokens", text_len=24)
    assert result.rows == len(corpus) == 96
    # what a person sees: one progress line, no Ray Data progress blocks, no core worker error line
    out, err = capfd.readouterr()
    assert [line for line in out.splitlines() if line.startswith("tokenize-corpus:")] == \
        [line for line in out.splitlines() if "tokenize-corpus" in line] and "2/2 shards, 96 rows" in out
    assert not [line for line in (out + err).splitlines() if "logging_progress" in line or "core_worker" in line
                or "Execution plan" in line or "Progress bars disabled" in line or "DeprecationWarning" in line]
    part = pq.read_table(tmp_path / "tokens" / "00000.parquet")
    assert part.schema.field("text_tokens").type == pa.list_(pa.uint16())
    assert part.schema.field("image_tokens").type == pa.list_(pa.uint16(), 64)
    meta = {k.decode(): v.decode() for k, v in part.schema.metadata.items()}
    assert meta["dvae_hash"] == checkpoint.weights_hash(dvae_dir)
    assert meta["grid_size"] == "8" and meta["image_vocab"] == "64"
    assert pq.ParquetFile(tmp_path / "tokens" / "00000.parquet").metadata.row_group(0).column(0).compression == "ZSTD"

    table, manifest = read(tmp_path / "tokens")
    assert manifest["rows"] == 96 and [p["rows"] for p in manifest["parts"]] == [64, 32]
    # round trip: the stored image tokens are the dVAE's codes of the corpus images, captions decode back
    by_key = {key: i for i, key in enumerate(corpus.keys)}
    order = [by_key[k] for k in table.column("key").to_pylist()]
    text, lengths, image = to_tensors(table, 24)
    model = DiscreteVAE(DVAEModelConfig(**json.loads((dvae_dir / "config.json").read_text())["config"]))
    model.load_state_dict(checkpoint.load(dvae_dir, KIND)[0])
    expected = model.eval().encode(to_float(corpus.images[order]))
    assert torch.equal(image, expected)
    tokenizer = TextTokenizer.load(tokenizer_path, 24)
    assert tokenizer.decode(text[0, : lengths[0]].tolist()) == corpus.captions[order[0]].lower()


def test_rerun_skips_parts_already_written(inputs, tmp_path):
    curated, dvae_dir, tokenizer_path, _ = inputs
    run(curated, dvae_dir, tokenizer_path, tmp_path, text_len=24)
    first = tmp_path / "00000.parquet"
    stamp = first.stat().st_mtime_ns
    (tmp_path / "00001.parquet").unlink()  # as if a run died after the first part
    (tmp_path / MANIFEST).unlink()
    result = run(curated, dvae_dir, tokenizer_path, tmp_path, text_len=24)
    assert first.stat().st_mtime_ns == stamp
    assert result.rows == 96 and (tmp_path / "00001.parquet").exists()


def test_a_dataset_without_manifest_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        read(tmp_path)


def test_corrupt_images_are_skipped_not_fatal(inputs, tmp_path):
    from dalle_pipeline.components.shards import Sample, read_shard, write_shard

    curated, dvae_dir, tokenizer_path, _ = inputs
    samples = list(read_shard(curated / "00001.tar"))[:5]
    samples.append(Sample(key="broken", image_bytes=b"not a png", image_ext="png", caption="a red circle"))
    write_shard(tmp_path / "in" / "00000.tar", samples)
    write_shard(tmp_path / "in" / "00001.tar", [])  # an empty shard gives an empty part
    result = run(tmp_path / "in", dvae_dir, tokenizer_path, tmp_path / "out", text_len=24)
    assert result.rows == 5
    assert np.all(np.array(read(tmp_path / "out")[0].column("key").to_pylist()) != "broken")
    assert result.manifest["skipped"] == 1
    assert [(p["rows"], p["skipped"]) for p in result.manifest["parts"]] == [(5, 1), (0, 0)]


def test_the_decode_check_compares_with_the_psnr_training_reported(inputs, tmp_path):
    """The check decodes stored tokens of sampled rows against their shard images: it agrees with the
    dVAE's own evaluation on the corpus, and a dVAE reported far better than its tokens decode is refused."""
    from dalle_pipeline.components.dvae.model import load
    from dalle_pipeline.components.dvae.model import reconstruction_quality as evaluate

    curated, dvae_dir, tokenizer_path, corpus = inputs
    model = load(dvae_dir)
    measured = evaluate(model, corpus.images, 32)[0]["eval_psnr"]
    honest = checkpoint.save(tmp_path / "honest", KIND, model.state_dict(), model.cfg.to_dict(),
                             meta={"eval_psnr": measured})
    check = run(curated, honest, tokenizer_path, tmp_path / "ok", text_len=24).manifest["decode_check"]
    assert check["rows"] == 64 and check["dvae_eval_psnr"] == measured
    assert abs(check["psnr"] - measured) < 1.0
    boasting = checkpoint.save(tmp_path / "boasting", KIND, model.state_dict(), model.cfg.to_dict(),
                               meta={"eval_psnr": measured + 10})
    with pytest.raises(ValueError, match="decode check failed"):
        run(curated, boasting, tokenizer_path, tmp_path / "refused", text_len=24)
    assert not (tmp_path / "refused" / MANIFEST).exists()


def test_the_decode_check_reads_the_shapes_back_as_the_dvae_stage_did(inputs, tmp_path):
    """On the shapes corpus (its rows carry their shapes) the check runs the oracle on the decoded
    rows: it agrees with the oracle on the same dVAE's reconstructions, and a dVAE that reported it
    keeps colour it does not keep is refused, naming the attribute."""
    from dalle_pipeline.components.corpus import oracle, specs_from_json
    from dalle_pipeline.components.dvae.model import load, reconstruct
    from dalle_pipeline.components.shards import iter_samples

    curated, dvae_dir, tokenizer_path, _ = inputs
    model = load(dvae_dir)
    samples = list(iter_samples(curated))
    assert all(sample.meta.get("objects") for sample in samples)  # the shapes travel with the rows
    reconstructions = reconstruct(model, np.stack([sample.pixels() for sample in samples]))
    read = oracle.mean_scores([oracle.score(image, specs_from_json(sample.meta["objects"]))
                               for image, sample in zip(reconstructions, samples)])
    honest = checkpoint.save(tmp_path / "honest", KIND, model.state_dict(), model.cfg.to_dict(),
                             meta={f"recon_oracle_{name}": read[name] for name in oracle.ATTRIBUTES})
    check = run(curated, honest, tokenizer_path, tmp_path / "ok", text_len=24).manifest["decode_check"]
    assert check["oracle_rows"] == 64
    assert all(abs(check[f"oracle_{name}"] - read[name]) < 0.2 for name in oracle.ATTRIBUTES)
    assert read["colour"] < 0.7  # untrained: it loses colour, so a claim of 1.0 is a lie the check can see
    boasting = checkpoint.save(tmp_path / "boasting", KIND, model.state_dict(), model.cfg.to_dict(),
                               meta={"recon_oracle_colour": 1.0})
    with pytest.raises(ValueError, match="decode check failed.*colour the oracle reads right"):
        run(curated, boasting, tokenizer_path, tmp_path / "refused", text_len=24)
    assert not (tmp_path / "refused" / MANIFEST).exists()


def test_curated_shards_on_an_object_store_are_tokenized_where_they_lie(inputs, tmp_path, monkeypatch):
    """The curated shards, the dVAE and the text tokenizer on S3 (moto's server), given as their URLs: read by the
    Ray Data tasks and the encoder there, the decode check's shards too; the same parts, byte for byte (the same
    hashes of the dVAE's weights and the tokenizer in their metadata), as from local files. Written into a URL: the
    same parts put on the store, the manifest last; a run that died before its last part and manifest resumes there,
    the parts it wrote not put again; the prior's and the dVAE's readers read the dataset and the shards there."""
    import fsspec
    import ray
    from local_processes import S3Endpoint

    from dalle_pipeline.components.prior.train import captions_of
    from dalle_pipeline.components.token_parquet import TokenParquet
    from dalle_pipeline.components.training.image_shards import ImageShards

    curated, dvae_dir, tokenizer_path, _ = inputs
    here = run(curated, dvae_dir, tokenizer_path, tmp_path / "here", text_len=24)
    ray.shutdown()  # the workers of a Ray started before the endpoint would not know it
    s3 = S3Endpoint()
    try:
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        fs, _ = fsspec.core.url_to_fs(f"s3://{s3.bucket}")
        fs.put(str(curated), f"{s3.bucket}/curated", recursive=True)
        fs.put(str(dvae_dir), f"{s3.bucket}/dvae", recursive=True)
        fs.put_file(str(tokenizer_path), f"{s3.bucket}/tokenizer.json")
        inputs_there = (f"s3://{s3.bucket}/curated", f"s3://{s3.bucket}/dvae", f"s3://{s3.bucket}/tokenizer.json")
        there = run(*inputs_there, tmp_path / "there", text_len=24)
        on_store = run(*inputs_there, f"s3://{s3.bucket}/tokens", text_len=24)
        assert str(on_store.dataset_dir) == f"s3://{s3.bucket}/tokens"
        tokens = f"{s3.bucket}/tokens"
        assert sorted(name.rsplit("/", 1)[1] for name in fs.ls(tokens)) == ["00000.parquet", "00001.parquet", MANIFEST]
        assert fs.cat_file(f"{tokens}/00000.parquet") == (tmp_path / "here" / "00000.parquet").read_bytes()
        first_put = fs.info(f"{tokens}/00000.parquet")["LastModified"]
        fs.rm_file(f"{tokens}/00001.parquet")  # as if the run died after its first part
        fs.rm_file(f"{tokens}/{MANIFEST}")
        resumed = run(*inputs_there, f"s3://{s3.bucket}/tokens", text_len=24)
        assert fs.info(f"{tokens}/00000.parquet")["LastModified"] == first_put and fs.isfile(f"{tokens}/{MANIFEST}")
        rows = np.arange(0, 96, 7)
        read_there = TokenParquet(f"s3://{s3.bucket}/tokens").read_rows(rows)
        captions_there = captions_of(TokenParquet(f"s3://{s3.bucket}/tokens"), rows)  # the prior's previews
        shards_there = ImageShards(f"s3://{s3.bucket}/curated", 32)
        pixels_there = shards_there.read_group(1, np.arange(5))
    finally:
        ray.shutdown()
        s3.stop()
    assert there.rows == here.rows == on_store.rows == resumed.rows == 96
    assert [(part["file"], part["rows"], part["sha256"], part["source_shard"]) for part in there.manifest["parts"]] \
        == [(part["file"], part["rows"], part["sha256"], part["source_shard"]) for part in here.manifest["parts"]] \
        == [(part["file"], part["rows"], part["sha256"], part["source_shard"]) for part in resumed.manifest["parts"]]
    assert there.manifest["decode_check"] == here.manifest["decode_check"] == resumed.manifest["decode_check"]
    assert all(torch.equal(a, b) for a, b in zip(read_there, TokenParquet(tmp_path / "here").read_rows(rows)))
    assert captions_there == captions_of(TokenParquet(tmp_path / "here"), rows) and len(set(captions_there)) > 1
    assert shards_there.num_rows == 96 and np.array_equal(pixels_there[0],
                                                          ImageShards(curated, 32).read_group(1, np.arange(5))[0])
