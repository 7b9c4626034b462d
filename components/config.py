"""Presets and validation: one pydantic model per stage, composed into `PipelineConfig`.

Every field has a type, a default for the `tiny` preset and a one-line doc. A preset is a
set of field overrides on top of those defaults; `resolve(preset, overrides)` builds and
validates the whole config before any work starts, so a bad value fails with its field's
dotted name. `overrides.PipelineOverrides`, derived from these configs, is the flow's typed
`overrides` parameter: the same fields nested per stage, all optional.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .dotted import ConfigError, dotted_overrides, merge_trees, parse_override, set_dotted, validation_problems
from .presets import PRESETS
from .saved_configs import upgrade


class StageConfig(BaseModel):
    """Base for stage configs: unknown fields are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(StageConfig):
    num_images: int = Field(4000, ge=1, description="number of captioned training images to generate")
    image_size: int = Field(32, ge=16, description="side of the generated square PNGs, in pixels")
    max_shapes: int = Field(1, ge=1, le=3, description="most shapes drawn per image")
    zero_shot_pairs: list[tuple[str, str]] = Field(
        default_factory=lambda: [("red", "triangle"), ("blue", "circle")],
        description="colour-shape pairs that never appear in training captions: the zero-shot prompts",
    )
    seed: int = Field(0, description="seed of the generator")


JPEG_FROM_SIZE = 256  # download.encode_format auto: the image size from which shards hold JPEGs
ImageData = Literal["auto", "memory", "stream"]
IMAGE_DATA = ("how training reads the curated images: decoded into memory, streamed from the shards per rank, or "
              "'auto': streamed once the decoded corpus passes 1 GiB")
SourceFormat = Literal["auto", "url_list", "folder", "webdataset", "parquet", "coco"]


class DataConfig(StageConfig):
    """Where the training images and captions come from (`components/sources`)."""

    source: str | None = Field(
        None, description="your data: a URL list, a folder of captioned images, a folder of webdataset .tar shards, "
                          "Parquet with the images inside, or a COCO captions JSON; None: the embedded shapes corpus"
    )
    format: SourceFormat = Field("auto", description="what `source` is; 'auto': recognised from the path")
    url_col: str = Field("url", min_length=1, description="URL list column holding the image URLs")
    caption_col: str = Field(
        "caption", min_length=1, description="caption column (URL list, Parquet, captions.csv) or key (JSON sidecars)"
    )
    image_col: str = Field("image", min_length=1, description="Parquet column holding the images (bytes, or a "
                                                                "struct with a `bytes` field as `datasets` exports)")
    images_dir: str | None = Field(None, description="COCO: the folder of the images the JSON names; None: looked "
                                                     "for beside the JSON")
    holdout_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of your corpus held out for evaluation (by a hash of each item's URL or "
                                      "id, so it stays put as the corpus grows); no stage trains on it"
    )
    holdout_max: int = Field(1000, ge=2, description="most held-out images evaluated against (the lowest hashes)")


class DownloadConfig(StageConfig):
    processes_count: int = Field(1, ge=1, description="img2dataset worker processes (or Ray tasks at once)")
    thread_count: int = Field(8, ge=1, description="img2dataset download threads per process")
    samples_per_shard: int = Field(1000, ge=1, description="samples per webdataset shard")
    batch_urls: int = Field(1_000_000, ge=1, description="new URLs a batch downloads at most: a longer list is "
                                                          "several batches, each finished before the next is read")
    timeout: int = Field(10, ge=1, description="seconds before a download is abandoned")
    retries: int = Field(1, ge=0, description="retries of a URL that can succeed later (timeout, 429, 5xx)")
    max_retry_after: float = Field(30.0, ge=0, description="longest Retry-After (s) waited for before a retry")
    encode_format: Literal["auto", "png", "jpg", "webp"] = Field(
        "auto", description=f"image format in the shards; 'auto': jpg (quality 95) from {JPEG_FROM_SIZE} px up, "
                            "where PNG encoding is most of an ingest's time, png below (small images stay exact)"
    )
    encode_quality: int | None = Field(
        None, ge=0, le=100, description="JPEG/WebP quality 0-100 or PNG zlib level 0-9 (None: 95 or 6)"
    )
    resize_mode: Literal["no", "border", "keep_ratio", "center_crop"] = Field(
        "center_crop", description="how img2dataset fits images to the preset's image size"
    )
    min_image_size: int = Field(0, ge=0, description="img2dataset drops images whose shorter side is smaller")
    max_aspect_ratio: float | None = Field(None, ge=1, description="img2dataset drops longer/shorter above this")
    compute_hash: Literal["sha256", "md5", "sha512"] | None = Field(
        "sha256", description="hash of the downloaded bytes in each sample's metadata (exact dedupe uses sha256)"
    )
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that forbid an image; [] ignores the header",
    )
    user_agent_token: str | None = Field(None, description="token added to the User-Agent, matched in X-Robots-Tag")
    distributor: Literal["auto", "multiprocessing", "ray"] = Field(
        "auto", description="img2dataset's workers: processes on this machine, or Ray tasks on every node of the "
                            "cluster; 'auto': Ray where the flow's Ray session spans several nodes"
    )
    max_image_bytes: int = Field(20_000_000, ge=1, description="larger downloads are refused (too_large)")
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="images with more pixels are refused before decoding (decompression_bomb)"
    )
    allow_file_urls: bool | None = Field(
        None, description="accept file:// URLs; None: only for the embedded shapes corpus (its images are files)"
    )


    def image_format(self, image_size: int) -> str:
        """`encode_format` with 'auto' resolved for images of `image_size` px."""
        if self.encode_format != "auto":
            return self.encode_format
        return "jpg" if image_size >= JPEG_FROM_SIZE else "png"


class FilterConfig(StageConfig):
    min_image_size: int = Field(16, ge=1, description="drop images whose original shorter side is smaller")
    max_aspect_ratio: float = Field(3.0, ge=1, description="drop images whose original longer/shorter side is above")
    min_caption_chars: int = Field(1, ge=0, description="drop captions shorter than this after stripping")
    max_caption_chars: int = Field(1000, ge=1, description="drop captions longer than this")
    caption_blocklist: list[str] = Field(
        default_factory=list, description="drop captions containing any of these words or phrases (any case)"
    )
    drop_exact_duplicates: bool | None = Field(
        None, description="drop an image whose sha256 was kept before, in any run; None: on, but for the embedded "
                          "shapes corpus (a few hundred scenes recur under many captions)"
    )
    near_duplicate_distance: int | None = Field(
        None, ge=0, le=15, description="drop an image whose perceptual hash is within this many bits of a kept one"
    )
    clip_model: str | None = Field(
        None, description="open_clip model for the CLIP-score filter: a name (e.g. ViT-B-32) or local-dir:/path"
    )
    clip_pretrained: str | None = Field(None, description="its pretrained tag (e.g. laion2b_s34b_b79k) or weights file")
    clip_min_score: float = Field(
        0.28, ge=-1, le=1, description="drop below this image-caption cosine (LAION: 0.28 for ViT-B/32)"
    )


class TokenizerConfig(StageConfig):
    vocab_size: int = Field(512, ge=260, description="byte-level BPE vocabulary size, specials included")
    lowercase: bool = Field(True, description="lower-case captions before BPE")
    text_len: int = Field(24, ge=4, description="text positions in the prior; longer captions are cut")
    bpe_dropout: float = Field(
        0.0, ge=0, lt=1, description="BPE dropout when tokenizing the training corpus (paper: 0.1); sampling never drops"
    )


class OptimConfig(StageConfig):
    steps: int = Field(1000, ge=1, description="optimizer updates")
    batch_size: int = Field(64, ge=1, description="global batch size")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(1e-5, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(50, ge=0, description="linear warmup updates")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas")
    grad_clip: float = Field(1.0, gt=0, description="max global grad norm")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of weights (0 = off)")
    log_every: int = Field(25, ge=1, description="log metrics every this many updates")
    num_threads: int = Field(0, ge=0, description="torch CPU threads (0 = all cores)")
    grad_accum_steps: int = Field(1, ge=1, description="batches whose gradients make one update")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="bf16 autocast, weights stay fp32; 'auto': bf16 where the device has bf16 units"
    )
    compile: bool | None = Field(None, description="torch.compile the model; None = on for CUDA only")


class DVAEOptimConfig(OptimConfig):
    steps: int = Field(1000, ge=0, description="optimizer updates (0: dvae.pretrained used as it is)")


class RayTrainConfig(StageConfig):
    """What a stage trained under Ray Train's TorchTrainer needs besides its model and optimizer."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (a GPU each where the cluster has them)")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="'auto': a GPU per worker on a cluster with GPUs (an error where it has fewer than the "
        "workers), CPUs on one without; 'cpu': CPU workers over gloo on any cluster; 'gpu': GPUs or an error")
    checkpoint_every: int = Field(250, ge=1, description="report a checkpoint to Ray every this many updates")
    keep_checkpoints: int = Field(2, ge=1, description="Ray keeps this many checkpoints (the best, where scored)")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint")


class DVAEArchitecture(StageConfig):
    """The dVAE's shape: with the image size (`dvae.model.DVAEModelConfig`) it rebuilds the model."""

    codebook_size: int = Field(256, ge=2, description="number of image codes")
    n_hid: int = Field(24, ge=4, description="base width; groups are 1, 2, 4, 8 x n_hid")
    num_groups: int = Field(3, ge=2, le=4, description="residual groups; downsampling = 2**(num_groups-1)")
    blocks_per_group: int = Field(1, ge=1, description="residual blocks per group")
    logit_laplace_eps: float = Field(0.1, gt=0, lt=0.5, description="pixels are mapped into [eps, 1-eps]")
    quantizer: Literal["gumbel", "vq"] = Field("vq", description="the image tokenizer kind: gumbel (the paper's "
                                               "dVAE) or vq (l2-normalised codes, nearest by cosine; dvae/model.py)")
    code_dim: int = Field(8, ge=2, description="vq: dimension of each code (l2-normalised)")
    codebook_decay: float = Field(0.9, gt=0, lt=1, description="vq: EMA decay of the codebook's cluster means")
    decoder_layout: Literal["mirrored", "openai"] = Field(
        "mirrored", description="'openai': OpenAI's released decoder (a 1x1 conv from the codes to decoder_width "
        "channels, residual kernels 1, 3, 3, 3), which loads its weights; 'mirrored': the encoder mirrored (a 1x1 "
        "conv to 4 x n_hid, kernels 1, 3, 3, 1), what checkpoints before the field have")
    decoder_width: int = Field(128, ge=8, description="'openai' layout: channels of the decoder's input conv "
                               "(OpenAI's n_init)")

    @property
    def downsample(self) -> int:
        """Pixels per token along a side: each group after the first halves the resolution."""
        return 2 ** (self.num_groups - 1)


class PretrainedTokenizer(StageConfig):
    """An image tokenizer as its authors released it (dvae/pretrained.py), used instead of training one."""

    kind: Literal["openai", "taming", "diffusers"] = Field(
        description="'openai': OpenAI's dVAE (encoder.pkl, decoder.pkl); 'taming': a taming-transformers VQGAN "
        "(VQModel or GumbelVQ: a .ckpt and its .yaml); 'diffusers': a diffusers VQModel folder (aMUSEd's VQ)")
    path: str = Field(description="openai: the folder holding encoder.pkl and decoder.pkl; taming: the .ckpt; "
                      "diffusers: the folder holding config.json and diffusion_pytorch_model.safetensors")
    config: str | None = Field(None, description="taming: the model's .yaml (default: the one beside the .ckpt, "
                               "or in its log folder's configs/)")

    @field_validator("path", "config")
    @classmethod
    def _home_expanded(cls, value: str | None) -> str | None:
        return None if value is None else str(Path(value).expanduser())


class DVAEConfig(RayTrainConfig, DVAEArchitecture):
    image_data: ImageData = Field("auto", description=IMAGE_DATA)
    temperature_start: float = Field(1.0, gt=0, description="gumbel-softmax temperature at step 0")
    temperature_end: float = Field(1 / 16, gt=0, description="temperature after the anneal")
    temperature_anneal_steps: int = Field(1600, ge=1, description="cosine anneal length, updates")
    kl_weight: float = Field(6.6, ge=0, description="final KL weight beta")
    kl_warmup_steps: int = Field(200, ge=0, description="beta ramps 0 -> kl_weight over these updates")
    commitment_weight: float = Field(0.25, ge=0, description="vq: weight of ||z - sg(code)||^2, the commitment loss")
    recon_loss: Literal["logit_laplace", "mse"] = Field(
        "mse", description="pixel likelihood: the paper's logit-Laplace, or a Gaussian with fixed sigma (mse)"
    )
    mse_sigma: float = Field(0.1, gt=0, description="sigma of the Gaussian likelihood when recon_loss is mse")
    recon_grid_every: int = Field(250, ge=1, description="log a reconstruction grid every this many updates")
    recon_oracle_floor: float = Field(0.9, ge=0, le=1, description="shapes corpus: the stage fails when the "
                                      "oracle reads less of any attribute back from reconstructions of held-out scenes")
    adversarial_weight: float = Field(0.0, ge=0, description="weight of a patch discriminator's hinge loss on "
                                      "the reconstructions (dvae/losses.py; 0 = no discriminator)")
    adversarial_start: int = Field(0, ge=0, description="updates before the discriminator's loss reaches the dVAE "
                                   "(the discriminator itself learns from step 0)")
    discriminator_width: int = Field(32, ge=4, description="the patch discriminator's first-layer width")
    perceptual_weight: float = Field(0.0, ge=0, description="weight of the VGG16 perceptual distance (0 = none)")
    perceptual_weights: str | None = Field(None, description="a torchvision vgg16 state dict file for the perceptual "
                                           "distance (never downloaded)")
    init_from: str | None = Field(
        None, description="a dVAE checkpoint folder whose weights start training (fine-tuning); same architecture"
    )
    pretrained: PretrainedTokenizer | None = Field(
        None, description="a released tokenizer's files, used instead of training one: the stage records it "
        "(PSNR, codes used, reconstructions) and, with optim.steps > 0, fine-tunes it; its "
        "architecture and grid come from the files, not from the fields above")
    optim: DVAEOptimConfig = Field(
        # tiny's: 1600 updates of 32 images cost what 800 of 64 did, and hold recon oracle shape >= 0.99 on
        # every one of 8 seeds where 800 of 64 held 0.91-1.00 (bench/RESULTS.md, #31)
        default_factory=lambda: DVAEOptimConfig(steps=1600, batch_size=32, lr=2e-3, min_lr=1e-4, ema_decay=0.0)
    )

    @model_validator(mode="after")
    def _losses_are_consistent(self) -> DVAEConfig:
        if self.quantizer == "vq" and self.optim.ema_decay > 0:
            raise ValueError(
                f"dvae.optim.ema_decay {self.optim.ema_decay} with dvae.quantizer vq: the vq codebook is the "
                "cluster means of the live encoder's outputs, and an average of the encoder's weights has no "
                "codebook of its own (averaging the codes blends restarted ones into vectors no output is near); "
                "set dvae.optim.ema_decay=0, or use the gumbel kind")
        if self.optim.steps == 0 and self.pretrained is None:
            raise ValueError("dvae.optim.steps 0 trains nothing: set dvae.pretrained to a released tokenizer's "
                             "files, or train for at least one update")
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ValueError(f"dvae.perceptual_weight {self.perceptual_weight} needs dvae.perceptual_weights, the "
                             "file of a torchvision vgg16 state dict (nothing is downloaded)")
        return self


class PriorArchitecture(StageConfig):
    """The prior's shape: with the vocabularies and lengths of its data (`prior.model.PriorModelConfig`) it
    rebuilds the model."""

    layers: int = Field(4, ge=1, description="transformer layers")
    d_model: int = Field(128, ge=8, description="model width")
    heads: int = Field(4, ge=1, description="attention heads")
    attention: Literal["dalle", "dense"] = Field(
        "dalle", description="'dalle': row/column/conv image attention as the paper; 'dense': all causal"
    )
    conv_kernel: int = Field(11, ge=3, description="side of the causal convolutional attention window")
    dropout: float = Field(0.0, ge=0, lt=1, description="residual dropout")
    attention_backend: Literal["auto", "segments", "flex", "sdpa", "math"] = Field(
        "auto", description="'auto': text-plus-segments flash attention on CUDA, plain math attention on CPU"
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> PriorArchitecture:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        return self


class PriorConfig(RayTrainConfig, PriorArchitecture):
    text_loss_weight: float = Field(1 / 8, ge=0, le=1, description="share of the loss on text tokens")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="probability of a null caption (for guidance)")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="data parallel (replicas) or FSDP2 (parameters, grads and optimizer state sharded)"
    )
    activation_checkpointing: bool = Field(
        False, description="keep only each block's input for the backward pass, which recomputes the block"
    )
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(steps=500, batch_size=64, lr=2e-3, min_lr=1e-4, weight_decay=0.01,
                                            precision="auto")
    )
    shuffle_buffer_rows: int = Field(
        16_384, ge=0, description="token rows each worker shuffles in memory (the dataset is streamed)"
    )
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of token rows held out for validation")
    val_rows_max: int = Field(1024, ge=1, description="most validation rows (validation runs every checkpoint)")
    init_from: str | None = Field(
        None, description="a prior checkpoint folder whose weights start training (fine-tuning); same architecture"
    )
    preview_prompts: int = Field(4, ge=0, description="held-out captions the prior draws at every checkpoint into "
                                 "the MLflow run's image view (needs the dVAE; 0 = none)")

class ClipConfig(StageConfig):
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag or local checkpoint path; None trains our own"
    )
    model_name: str = Field("dalle-tiny-clip", description="open_clip model config name")
    embed_dim: int = Field(64, ge=8, description="joint embedding width")
    vision_width: int = Field(64, ge=8, description="ViT width")
    vision_layers: int = Field(2, ge=1, description="ViT layers")
    patch_size: int = Field(8, ge=1, description="ViT patch side in pixels")
    text_width: int = Field(64, ge=8, description="text transformer width")
    text_layers: int = Field(2, ge=1, description="text transformer layers")
    context_length: int = Field(24, ge=4, description="text positions of the CLIP text tower")
    image_data: ImageData = Field("auto", description=IMAGE_DATA)
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(steps=300, batch_size=128, lr=2e-3, min_lr=1e-4, weight_decay=0.1)
    )


class SampleConfig(StageConfig):
    num_prompts: int = Field(32, ge=1, description="held-out prompts sampled and evaluated")
    candidates: int = Field(16, ge=1, description="candidates drawn per prompt")
    keep: int = Field(4, ge=1, description="best candidates kept per prompt after CLIP reranking")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_k: int = Field(32, ge=0, description="keep the k most likely image tokens (0 = all)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep tokens holding this much mass")
    guidance_scale: float = Field(1.0, ge=0, description="classifier-free guidance with the null caption (1 = off)")
    batch_size: int = Field(128, ge=1, description="sequences decoded at once")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where candidates are drawn, decoded and scored ('auto': the GPU where there is one)"
    )
    grid_prompts: int = Field(8, ge=1, description="prompts shown in the sample grid")
    memory_gb: float | None = Field(
        None, gt=0, description="memory the prior's KV cache may take while drawing; batches shrink to fit it "
        "(None: 90% of the GPU's free memory after the models, or half the free RAM on the CPU)")
    prompts_file: str | None = Field(
        None, description="a text file of prompts, one per line (a published protocol such as COCO captions), in "
                          "place of held-out captions; your data only"
    )
    seed: int = Field(1234, description="seed of the sampling generator and of the held-out prompts")
    inception_weights: str | None = Field(
        None, description="torch-fidelity Inception weights file for FID; None: the torch hub cache, else no FID"
    )

    @model_validator(mode="after")
    def _keep_le_candidates(self) -> SampleConfig:
        if self.keep > self.candidates:
            raise ValueError(f"keep ({self.keep}) must not exceed candidates ({self.candidates})")
        return self


class PipelineConfig(StageConfig):
    preset: str = Field("tiny", description="name of the preset these values started from")
    seed: int = Field(0, description="global seed")
    data: DataConfig = Field(default_factory=DataConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    dvae: DVAEConfig = Field(default_factory=DVAEConfig)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    @property
    def shapes_corpus(self) -> bool:
        """True when the pipeline trains on the embedded shapes corpus (no `data.source`)."""
        return self.data.source is None

    @property
    def holdout_fraction(self) -> float:
        """The share of the corpus the filter holds out: none for the shapes corpus, whose evaluation set is drawn
        apart from its training stream."""
        return 0.0 if self.shapes_corpus else self.data.holdout_fraction

    def download_settings(self) -> DownloadConfig:
        """`download` with the source's defaults in place of None: file:// URLs for the shapes corpus only."""
        if self.download.allow_file_urls is not None:
            return self.download
        return self.download.model_copy(update={"allow_file_urls": self.shapes_corpus})

    def filter_settings(self) -> FilterConfig:
        """`filter` with the source's defaults in place of None: exact duplicates kept for the shapes corpus only."""
        if self.filter.drop_exact_duplicates is not None:
            return self.filter
        return self.filter.model_copy(update={"drop_exact_duplicates": not self.shapes_corpus})

    @model_validator(mode="after")
    def _image_fits_grid(self) -> PipelineConfig:
        if self.dvae.pretrained is None and self.corpus.image_size % self.dvae.downsample:
            raise ValueError(
                f"corpus.image_size ({self.corpus.image_size}) must be divisible by the dVAE "
                f"downsampling 2**(dvae.num_groups-1) = {self.dvae.downsample}"
            )
        if self.clip.pretrained is None and self.corpus.image_size % self.clip.patch_size:
            raise ValueError(
                f"corpus.image_size ({self.corpus.image_size}) must be divisible by clip.patch_size "
                f"({self.clip.patch_size})"
            )
        return self


def resolve(preset: str = "tiny", overrides: Any = None,
            base: dict[str, Any] | None = None) -> PipelineConfig:
    """Build the validated config of `preset` with `overrides`: a `PipelineOverrides` (the flow's
    parameter), a dict of dotted fields, or `k=v` strings (the CLI's `--set`).

    `base`, a whole config (a trained model's, for fine-tuning it), replaces the preset: the
    overrides then apply on top of it.
    """
    if base is None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    tree: dict[str, Any] = {"preset": preset}
    for dotted, value in {**(copy.deepcopy(PRESETS[preset]) if base is None else {}),
                          **dotted_overrides(overrides)}.items():
        set_dotted(tree, dotted, value)
    # nested optim sections start from the stage's own defaults, not OptimConfig's
    defaults = PipelineConfig().model_dump() if base is None else upgrade(base)
    tree = merge_trees(defaults, tree)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid config for preset {preset!r}: {validation_problems(err)}") from None
