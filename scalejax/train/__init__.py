"""Training: config, optimizers, the loop, checkpoints, preemption, non-finite steps,
records, metrics, multi-host start-up, process tuning, the run loader."""
