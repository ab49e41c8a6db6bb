"""The application around the model's core: the batch engine, result files, distributed runs, data sources, gallery
building and model loading that the `streetclip` command, the benchmark runner and training share.

It imports the core (`modeling_streetclip`'s flat modules); the core never imports it, so a folder saved for
`trust_remote_code` carries none of it. This module holds only what every entry point shares and `--help` shows,
without importing torch: the defaults, the exit statuses and the usage error.
"""

import os


EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # and for one whose reader went away, as in `| head` (128 + SIGPIPE)

# Batch inference defaults of `geolocate_images`, shared by `streetclip locate` and eval/benchmark.py; they live here,
# not in `batch`, so that `--help` can show them without importing torch. StreetCLIP's vision tower
# (ViT-L/14-336, random weights, forward only) on an H200 ran 833 / 1029 / 1052 img/s at batch 8 / 32 / 64 in bfloat16
# and 94 / 109 / 114 in float32: 32 takes nearly all of the gain, and a killed run loses at most one batch.
DEFAULT_BATCH_SIZE = 32
# Decoding and resizing a photo takes milliseconds of one core: a few workers overlap it with the forward pass. More
# workers than the cores this process may use would only take time from the model (and make torch warn).
DEFAULT_NUM_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
# Source rows per shard of a gallery build (`gallery_build`): a kill loses at most this much work (seconds on a GPU, a
# few minutes on a CPU at ViT-L), and a million rows make about a thousand files of 3 MB.
DEFAULT_SHARD_SIZE = 1024


class UsageError(ValueError):
    """A command line that cannot run (bad model, countries file, inputs or options); exits with status 2."""


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_NUM_WORKERS",
    "DEFAULT_SHARD_SIZE",
    "EXIT_BROKEN_PIPE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "EXIT_USAGE",
    "UsageError",
]
