"""Training: the per-worker loop, its checkpoints and metrics, and the Ray Train assembly around it."""
