"""Tiny diffusers pipelines with random weights, built by the tests themselves (weights
cannot be downloaded here), and a Hugging Face cache laid out around them."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

# The tokenizer's whole vocabulary: prompts in tests use these words.
WORDS = ("a", "fox", "in", "the", "snow", "photo", "of", "blurry", "dark", "cat")


def save_tiny_pipeline(directory: Path, tokenizer_source: Path) -> None:
    """A Stable Diffusion pipeline of a few hundred kilobytes, with random weights."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # Typed loosely: diffusers' constructors take their config as untyped keyword arguments.
    diffusers: Any = importlib.import_module("diffusers")

    # A byte-pair vocabulary of single letters and a few whole words, with no merges.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in sorted(set("".join(WORDS))):
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))
    for word in WORDS:
        vocab.setdefault(word + "</w>", len(vocab))
    tokenizer_source.mkdir(parents=True)
    (tokenizer_source / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_source / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(tokenizer_source / "vocab.json"),
        str(tokenizer_source / "merges.txt"),
        model_max_length=77,
    )
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # Stable Diffusion's own scheduler settings (the defaults draw a deprecation warning).
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)


def put_in_hf_cache(source: Path, cache: Path, repo_id: str) -> Path:
    """Lay `source` out as huggingface_hub's cache does: blobs by hash, a snapshot of
    symlinks per commit, and `refs/main` naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in sorted(source.rglob("*")):
        if not file.is_file():
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot
