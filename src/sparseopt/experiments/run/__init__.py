"""One training run: build, loop, precision, evaluation, checkpoints, logs, resume, stops, DDP."""
