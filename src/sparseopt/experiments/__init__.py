"""Experiment plumbing: configs, checkpoints, logs and the run loop."""
