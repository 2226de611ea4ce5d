"""A training run: its folder and checkpoints (atomic writes, resume state), the training loop and
its data, tracking and memory set-up."""
