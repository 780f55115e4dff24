"""Tasks: the only code that reads the Hydra config."""
