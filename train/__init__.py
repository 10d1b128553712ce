"""train: DeepSpeed orchestration (the training stack arrives with its own issue)."""
