"""Fine-tuning on the rehearsal set: the trainer and everything a training step needs.

`trainer` (setup, train_step, the loop), `batching` (micro-batches of packed rows),
`loss_weights` (per-source and per-token weights), `optim` (optimizer, schedule, run length),
`validation` (validation loss), `checkpoint` (save and resume), `distributed` (FSDP2 / DDP)
and `reporting` (TensorBoard, wandb, trackio).
"""
