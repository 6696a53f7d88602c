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


class SpoilHead(L.Callback):
    """Adds noise of standard deviation `scale` to the model's head at the start of each training epoch from
    `from_epoch` on: the epochs after it score worse on validation (the moved-folder resume test)."""

    def __init__(self, scale: float = 3.0, from_epoch: int = 1) -> None:
        self.scale, self.from_epoch = scale, from_epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        import torch

        if trainer.current_epoch >= self.from_epoch:
            generator = torch.Generator().manual_seed(trainer.current_epoch)
            with torch.no_grad():
                for parameter in pl_module.head.parameters():
                    parameter.add_(self.scale * torch.randn(parameter.shape, generator=generator).to(parameter))
