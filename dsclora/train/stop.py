"""Clean stops: a first SIGINT/SIGTERM asks the run to stop after the current step (with a
checkpoint); a second SIGINT interrupts at once (KeyboardInterrupt)."""
import contextlib
import logging
import signal
import threading

import torch

from . import distributed

logger = logging.getLogger("dsclora")

#: Signals that stop a run cleanly: the current step finishes and a checkpoint is saved.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl+C to the main process (which stops after the step)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopRequests:
    """``with requests.listening(): ... if requests.pending(): stop``; ``signal_name`` is the
    name of the signal that asked (None: none did)."""

    def __init__(self, ctx: distributed.Context):
        self.ctx = ctx
        self.signal_name: str | None = None

    @contextlib.contextmanager
    def listening(self):
        """Catch the stop signals for the duration of the block (main thread only: signals go there)."""
        self.signal_name = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self._request) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _request(self, signum, _frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        logger.warning("dsclora: %s: stopping after this step with a checkpoint (Ctrl+C again to abort)",
                       self.signal_name)

    def pending(self) -> bool:
        """Whether any process received a stop signal (all processes stop at the same step)."""
        if not self.ctx.distributed:
            return self.signal_name is not None
        return not distributed.all_true(self.ctx, torch.tensor(self.signal_name is None, device=self.ctx.device))
