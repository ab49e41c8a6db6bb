"""The application around the model's core (batch engine, result files, distributed runs, data sources, galleries,
loading), which the core never imports; here the exit codes and defaults all entry points share, without torch."""

import importlib
import os
from types import ModuleType


EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # and for one whose reader went away, as in `| head` (128 + SIGPIPE)

# Images per forward pass: nearly the speed of larger batches on a GPU (README, "Speed"); a kill loses one batch.
DEFAULT_BATCH_SIZE = 32
# A few workers overlap decoding with the forward pass; more than the cores this process may use take time from it.
DEFAULT_NUM_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
# Source rows per shard of a gallery build: a kill loses at most this much work.
DEFAULT_SHARD_SIZE = 1024


class UsageError(ValueError):
    """A command line that cannot run (bad model, countries file, inputs or options); exits with status 2."""


def import_optional(name: str, needed_for: str, install: str, error: type[Exception] = ImportError) -> ModuleType:
    """The module `name` of an optional dependency, or `error` saying what needs it and which extra installs it.
    (Not transformers' `requires_backends`: its messages name no extra, and it knows no pyarrow.)"""
    try:
        return importlib.import_module(name)
    except ImportError as missing:
        raise error(
            f"{needed_for} needs the `{name.partition('.')[0]}` package ({missing}); install it with {install}."
        ) from None
