"""Training components: FLOPs and MFU, metrics, checkpoints, LR schedulers, eval, the memory estimate and the trainer."""
