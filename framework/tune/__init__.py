"""Hyperparameter sweeps with Ray Tune over the Hydra config, and promotion of the winning checkpoint.

    sweep.py     the `tune` config (conf/tune/*), the search space, and the checks before any trial
    trial.py     one trial: a full Ray Train + DeepSpeed run reporting to Tune
    runner.py    the Tuner (search algorithm, scheduler), resuming, and the end of a sweep
    results.py   results table, plots, promotion of the best checkpoint to a Hugging Face folder

`launch/tune.py` composes `conf/tune.yaml` and calls `runner.run`; docs/tuning.md shows the commands.
"""
