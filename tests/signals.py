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



class LrLog(L.Callback):
    """Writes the learning rates in force at each optimizer step of this process to `path` (JSON lines)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import json

        lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "lrs": lrs}) + "\n")
