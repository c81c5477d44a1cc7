"""Train, sweep and serve language models on Ray from one Hydra config tree."""
