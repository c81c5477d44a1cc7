"""Hyperparameter sweeps with Ray Tune over the one config tree, and promotion of the winning checkpoint.

    config.py     the `tune` group's schema (conf/tune/*: an optional group of conf/config.yaml)
    space.py      the search space: Hydra's override grammar, read by Hydra's parser, as Ray Tune domains
    plan.py       the checked sweep, made once: settings, space, rules, every corner planned as a run
    runner.py     the Tuner (search algorithm, scheduler), resuming, and the end of a sweep
    trial.py      one trial: one Ray Train + DeepSpeed run (`make_plan` + `fit`) reporting to Tune
    pbt.py        what PBT may explore, its scheduler, and how a clone adopts another trial's checkpoint
    placement.py  the janitor that gives back the workers' placement group of a trial Tune ended
    results.py    the results table and plots; promotion.py exports the best trial (best.json, best/)
    bench.py      what a sweep costs over its trials' training (`python launch/bench.py bench=tune`)

`launch/tune.py` composes `conf/config.yaml` with `tune=asha` unless the command line picks a preset,
plans the sweep and calls `runner.run`; docs/tuning.md shows the commands.
"""
