"""Building the prompt heads of a plain CLIP checkpoint, and saving and reloading the result: the tiny test model and
StreetCLIP's real scale (ViT-L/14 at 336 px, random weights, which cost what trained ones do).

Prints, for each size, from one run on this machine:
- the load of the plain checkpoint with the paper's candidates (193 countries, their 30 most populous cities): the
  configuration, the GeoNames table, the weights, and every country and city head built from the text tower in one
  batched pass; with the number of prompts and their mean length in tokens;
- the first `save_pretrained` of that model (nothing is left to build);
- the load of the saved folder, with its text tower and without (`vision_only=True`).

Both sizes use the tiny byte-level tokenizer (CLIP's vocabulary cannot be downloaded here): one token per byte makes
the paper's prompts three to four times longer than CLIP's BPE does (about 10 tokens), so the ViT-L head building is
an upper bound.

Run: `python eval/speed/bench_head_building.py [--sizes tiny vit-l] [--workdir DIR]`.
"""

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from modeling_streetclip import StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.testing_utils import save_random_vit_l, save_tiny_clip_checkpoint


BUILDERS = {"tiny": save_tiny_clip_checkpoint, "vit-l": save_random_vit_l}


def timed(function):
    """`function()`'s result and the seconds it took."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def measure(size: str, workdir: Path) -> None:
    plain = BUILDERS[size](workdir / f"{size}-clip")
    model, load_s = timed(lambda: StreetCLIPForGeolocation.from_pretrained(plain))
    prompts = StreetCLIPProcessor.from_pretrained(plain).candidate_prompts(model.candidate_places)
    masks = [prompts.countries["attention_mask"], *(tokens["attention_mask"] for tokens in prompts.cities)]
    count = sum(len(mask) for mask in masks)
    mean_tokens = sum(int(mask.sum()) for mask in masks) / count
    print(
        f"{size}: plain checkpoint load, every head built: {load_s:.1f} s "
        f"({count} prompts of {mean_tokens:.0f} tokens on average)"
    )
    saved = workdir / f"{size}-streetclip"
    _, save_s = timed(partial(model.save_pretrained, saved))
    print(f"{size}: first save_pretrained: {save_s:.1f} s")
    del model  # one ViT-L in memory at a time
    _, reload_s = timed(lambda: StreetCLIPForGeolocation.from_pretrained(saved))
    _, vision_s = timed(lambda: StreetCLIPForGeolocation.from_pretrained(saved, vision_only=True))
    print(f"{size}: saved folder load: {reload_s:.1f} s, vision only {vision_s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--workdir", type=Path, help="where the checkpoints are written (default: a temporary one)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            measure(size, workdir)


if __name__ == "__main__":
    main()
