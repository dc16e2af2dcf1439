"""Training: the loop (trainer), optimizer and schedule, checkpoints, distributed, metrics.

`gptforge.train(cfg)` (the top-level function) is `gptforge.training.trainer.train`.
"""
