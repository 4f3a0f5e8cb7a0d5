"""Stage-1 training infrastructure: checkpoint/resume, weight EMA, LR schedules, DDP helpers and a
deterministic sharded sampler, preemption signals, run metadata. The training loop itself builds on
these; every piece is resumable bit-for-bit (its state goes into the checkpoint)."""
