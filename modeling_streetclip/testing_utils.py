"""Tiny random CLIP checkpoints and photos for tests and speed scripts, built without any download.

They mirror the published `geolocal/StreetCLIP` layout (a plain CLIP folder: config.json, weights, tokenizer and
image-processor files) at hidden size 32, so the loading code a user runs is exercised in milliseconds. transformers
ships its own `testing_utils`; this is ours, importable by tests and by the scripts under `eval/speed/` alike.
"""

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from .modeling_streetclip import StreetCLIPForGeolocation


# Six well-separated countries keep candidate tables small where a test does not need the paper's 193.
SMALL_COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Australia", "Canada"]
TINY_IMAGE_SIZE = 30


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP-format byte-level BPE tokenizer with one token per byte and no merges.

    Special tokens take the highest ids, as in OpenAI's vocabulary, so CLIP's end-of-text pooling finds them.
    """
    vocab = {}
    for suffix in ("", "</w>"):
        for char in sorted(ByteLevel.alphabet()):
            vocab[char + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_tiny_clip(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            **special,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=2,
        ),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def save_tiny_clip_checkpoint(path: Path, seed: int = 0, pickle_weights: bool = False) -> Path:
    """Save a plain CLIP checkpoint folder in the layout of `geolocal/StreetCLIP`; `pickle_weights` writes the
    legacy `pytorch_model.bin` that older Hub repos hold instead of safetensors."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_clip(tokenizer, seed)
    model.save_pretrained(path)
    if pickle_weights:
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    ).save_pretrained(path)
    return path


def place_in_hub_cache(folder: Path, cache_dir: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Lay `folder` out as the Hugging Face cache holds a downloaded repo (`models--ORG--NAME/snapshots/REV`)."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return repo_dir


def random_photo(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A deterministic random RGB photo."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def save_streetclip_folder(clip_dir: Path, path: Path, **from_pretrained_kwargs) -> Path:
    """Convert a plain CLIP folder into a saved StreetCLIPForGeolocation folder with heads and processor files."""
    model = StreetCLIPForGeolocation.from_pretrained(clip_dir, **from_pretrained_kwargs)
    model.save_pretrained(path)
    AutoImageProcessor.from_pretrained(clip_dir).save_pretrained(path)
    AutoTokenizer.from_pretrained(clip_dir).save_pretrained(path)
    return path
