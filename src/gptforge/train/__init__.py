"""Training: the loop (trainer), optimizer and schedule, checkpoints, distributed, metrics.

The package is callable: `gptforge.train(cfg, resume=None, progress=True)` is
`gptforge.train.trainer.train` (see gptforge/__init__.py for why a callable module).
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, cfg, resume=None, progress=True):
        """Train with `cfg` (a TrainConfig); returns a TrainResult (see trainer.train)."""
        from gptforge.train.trainer import train

        return train(cfg, resume=resume, progress=progress)


sys.modules[__name__].__class__ = _CallableModule
