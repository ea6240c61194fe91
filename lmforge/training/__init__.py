"""Training components: runtime, optimizer + schedule, checkpoints, metrics, and the loop."""
