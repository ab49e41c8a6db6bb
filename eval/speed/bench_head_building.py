"""Building every prompt head of a plain CLIP checkpoint, the first save and the saved folder's load, for the tiny test
model and at ViT-L/14 336 px (random weights). The tiny byte-level tokenizer makes prompts three to four times longer
than CLIP's BPE, so the ViT-L head building is an upper bound."""

import tempfile
from functools import partial
from pathlib import Path

from timing import load_vision, machine_line, seconds, speed_parser, timed

from modeling_streetclip import StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.testing_utils import save_random_vit_l, save_tiny_clip_checkpoint


BUILDERS = {"tiny": save_tiny_clip_checkpoint, "vit-l": save_random_vit_l}


def measure(size: str, workdir: Path) -> None:
    plain = BUILDERS[size](workdir / f"{size}-clip")
    model, load_s = timed(lambda: StreetCLIPForGeolocation.from_pretrained(plain))
    prompts = StreetCLIPProcessor.from_pretrained(plain).candidate_prompts(model.candidate_places)
    masks = [prompts.countries["attention_mask"], *(tokens["attention_mask"] for tokens in prompts.cities)]
    count = sum(len(mask) for mask in masks)
    mean_tokens = sum(int(mask.sum()) for mask in masks) / count
    print(
        f"{size}: plain checkpoint load, every head built: {load_s:.1f} s ({count} prompts, {mean_tokens:.0f} tokens)"
    )
    saved = workdir / f"{size}-streetclip"
    print(f"{size}: first save_pretrained: {seconds(partial(model.save_pretrained, saved)):.1f} s")
    del model  # one ViT-L in memory at a time
    reload_s = seconds(lambda: StreetCLIPForGeolocation.from_pretrained(saved))
    vision_s = seconds(lambda: load_vision(saved))
    print(f"{size}: saved folder load: {reload_s:.1f} s, vision only {vision_s:.1f} s")


def main() -> None:
    parser = speed_parser(__doc__)
    parser.add_argument("--sizes", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--workdir", type=Path, help="where the checkpoints are written (default: a temporary one)")
    args = parser.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            measure(size, workdir)


if __name__ == "__main__":
    main()
