"""One command on one process or many (`accelerate launch`, `torchrun`): every process learns the outcome of a step
that runs on one or on all, so that an error stops all of them with one message instead of leaving others waiting."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, TypeVar

from . import EXIT_USAGE, UsageError
from .records import ResultFileError


if TYPE_CHECKING:
    from accelerate import Accelerator

T = TypeVar("T")
# The errors a command reports in one line and exits 2 for; they cross between processes (they pickle).
COMMAND_ERRORS = (UsageError, ResultFileError)


def make_accelerator(device: str, cpu_only: bool = False) -> Accelerator:
    """The `Accelerator` of this process on `device` ("auto", "cpu" or "cuda"); `cpu_only` for an int8 model.
    Without a GPU, "auto" asks for the CPU explicitly, which makes a launcher's processes one process group (gloo)."""
    import torch
    from accelerate import Accelerator

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device; use --device cpu or auto.")
    accelerator = Accelerator(cpu=cpu_only or device == "cpu" or not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # a mismatch would have each process run every input
    if accelerator.num_processes != launched:
        raise UsageError(
            f"the launcher started {launched} processes, but Accelerate joined {accelerator.num_processes}; "
            "check the launcher's settings (accelerate config) or run a single process."
        )
    return accelerator


def _outcome(work: Callable[[], T], errors: tuple[type[Exception], ...]) -> tuple[T | None, Exception | None]:
    try:
        return work(), None
    except errors as error:
        return None, error


def on_main_process(
    accelerator: Accelerator | None, work: Callable[[], T], errors: tuple[type[Exception], ...] = COMMAND_ERRORS
) -> T:
    """Run `work` on the main process only (here without an `accelerator`) and return its result on every process;
    an error of `errors` (by default a command error) there is raised on every process."""
    if accelerator is None:
        return work()
    from accelerate.utils import broadcast_object_list

    outcome = list(_outcome(work, errors)) if accelerator.is_main_process else [None, None]
    broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def on_every_process(
    accelerator: Accelerator,
    work: Callable[[], T],
    main_process_first: bool = False,
    errors: tuple[type[Exception], ...] = COMMAND_ERRORS,
) -> T:
    """Run `work` on every process (on the main one first with `main_process_first`, e.g. to download once) and
    return its result; an error of `errors` (by default a command error) on any process is raised on all."""
    from accelerate.utils import gather_object

    with accelerator.main_process_first() if main_process_first else nullcontext():
        result, error = _outcome(work, errors)
    raised = [caught for caught in gather_object([error]) if caught is not None]
    if raised:
        raise raised[0]
    return result


def quiet_unless_main(accelerator: Accelerator, command: Callable[[], int]) -> int:
    """Run `command` and return its status; a command error gives status 2, and its message on the main process only.
    Every process then leaves the process group together: one that exits first can make a peer abort."""
    status, error = _outcome(command, COMMAND_ERRORS)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if error is not None and accelerator.is_main_process:
        try:
            raise error
        finally:
            error = None  # as `except ... as` does: the frame must not keep the error (and the output's lock) alive
    return status if error is None else EXIT_USAGE


__all__ = ["COMMAND_ERRORS", "make_accelerator", "on_every_process", "on_main_process", "quiet_unless_main"]
