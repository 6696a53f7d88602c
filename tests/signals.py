"""A callback the resume tests put into real `train.py` runs (`+callbacks.kill._target_=...`)."""

import os
import signal

import lightning as L


class SigtermAtStep(L.Callback):
    """Sends this process a real SIGTERM after optimizer step `step` (rank 0; Lightning tells the others)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero and not trainer.received_sigterm:
            os.kill(os.getpid(), signal.SIGTERM)

