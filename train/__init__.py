"""train: the DeepSpeed training stack behind kd-train (engines, data, the step, checkpoints, evaluation)."""
