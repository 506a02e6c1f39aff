"""Training/evaluation engine shared by the task scripts: config handling, the training loop, tasks."""
