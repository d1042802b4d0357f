"""How a training process ends: on a signal at a step boundary, and with its process group torn down.

Signals (SIGINT from Ctrl-C, SIGTERM from Kubernetes before it kills a pod):

- During training, the first signal is a request: every rank finishes its current optimizer
  step, the ranks agree at every step end and every save (an all-reduce of "did any rank get a signal?", so one preempted pod
  or a signal delivered only to rank 0 stops all ranks at the same step), a checkpoint is
  saved (always: a preempted pod wants its progress, and a user who pressed Ctrl-C wants to
  resume where they stopped), and training returns; the entry point then exits with
  128 + the signal number (130 for SIGINT, 143 for SIGTERM) and one line saying where the
  last checkpoint is and how to resume. If the save does not finish (SIGKILL at the end of
  the grace period), the checkpoint is left without its completion marker and resume skips
  it (g2rpo.train.checkpoints).
- Before training has started (loading the model or data) or after it ended, there is nothing
  to save: the signal raises `StopRequested` at once.
- A second signal more than `DUPLICATE_WINDOW_S` after the first aborts at once
  (os._exit, no traceback): under `torchrun`/`accelerate launch` a Ctrl-C reaches each rank
  twice, from the terminal and forwarded by the launcher, and that must count as one.

Teardown: a gloo or NCCL process group left alive until interpreter exit can abort the process
(SIGABRT, "terminate called without an active exception"): a gloo worker thread that releases
its last finished work during interpreter finalisation needs the GIL to drop the tensors'
Python objects, Python ends that thread with a forced unwind through a noexcept destructor,
and C++ calls std::terminate (pytorch/pytorch#190489). `distributed_teardown` destroys the
process group while the interpreter is alive; that alone still aborted 1 of 16 two-rank runs
(a worker thread can outlive destroy_process_group while something still references the
group), so a distributed entry point ends with `exit_process`: flush, then os._exit, with no
interpreter finalisation for those threads to race with.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from transformers import TrainerCallback

DUPLICATE_WINDOW_S = 1.0
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What signal.signal takes and returns: a handler, SIG_DFL or SIG_IGN, or None (a handler not set from Python).
_Handler = Callable[[int, FrameType | None], Any] | int | None


class StopRequested(BaseException):
    """A signal asked the process to stop (a BaseException, like KeyboardInterrupt: no `except Exception` eats it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def exit_code_for(signum: int) -> int:
    return 128 + signum


class StopSignals:
    """SIGINT/SIGTERM handlers that turn the first signal into a stop request (see the module docstring)."""

    def __init__(self, duplicate_window_s: float = DUPLICATE_WINDOW_S):
        self.duplicate_window_s = duplicate_window_s
        self.signum: int | None = None  # the signal this process received
        self.stopped_by: int | None = None  # the signal training stopped for, agreed by all ranks
        self.training = False
        self._first_at = 0.0
        self._previous: dict[int, _Handler] = {}

    def install(self) -> StopSignals:
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if not self.training:
                raise StopRequested(signum)
            if _is_main_rank():
                print(
                    f"\n{signal.Signals(signum).name}: stopping after the current step and saving a checkpoint "
                    "(press Ctrl-C again to abort at once)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if now - self._first_at < self.duplicate_window_s:
            return  # the same Ctrl-C, forwarded by the launcher
        print(
            f"\n{signal.Signals(signum).name} again: aborted at once; a checkpoint being written is left "
            "incomplete and resume skips it",
            file=sys.stderr,
            flush=True,
        )
        os._exit(exit_code_for(self.signum))


class StopAtStepBoundary(TrainerCallback):
    """Ends training at the first step boundary after a stop request, on every rank alike, saving first."""

    def __init__(self, signals: StopSignals):
        self.signals = signals

    def on_train_begin(self, args, state, control, **kwargs):
        self.signals.training = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed_stop():
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        # A signal during a save: the checkpoint is complete now, which is a step boundary too.
        if self._agreed_stop():
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.signals.training = False

    def _agreed_stop(self) -> bool:
        """Whether any rank got a signal; every rank records the same one (the highest number) in stopped_by."""
        import torch
        import torch.distributed as dist

        signum = self.signals.signum or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from accelerate import PartialState

            flag = torch.tensor([signum], device=PartialState().device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            self.signals.stopped_by = signum
        return bool(signum)


@contextmanager
def distributed_teardown() -> Iterator[None]:
    """Destroy the default process group when the block ends normally, on a stop request or a SpecError.

    On any other exception the group is left alone: destroying it while another rank still
    waits in a collective can hang, and that rank's failure is already the news.
    """
    from g2rpo.api.spec import SpecError

    try:
        yield
    except (StopRequested, SpecError):
        destroy_process_group()
        raise
    else:
        destroy_process_group()


def exit_process(code: int) -> None:
    """End a process that ran a process group: flush what Python buffers, then exit without
    interpreter finalisation (see the module docstring). Every file g2rpo writes is closed by then."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"
