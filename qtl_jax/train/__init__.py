"""Two-stage training: optimizer rules, the split train step, checkpoints and the training loop."""
