"""Sweep: `python launch/tune.py [tune=asha|grid|optuna|pbt] [tune.name=...] [+tune.space.optim.lr='"tag(log, interval(1e-4, 3e-3))"'] [experiment=smoke] ...`"""

from framework.cli import entry
from framework.tune.plan import SWEEP
from framework.tune.sweep import SweepPlan


@entry(SWEEP)
def main(plan: SweepPlan) -> None:
    from framework.tune.runner import run_sweep

    if run_sweep(plan).interrupted:
        raise SystemExit(130)  # as a shell reports Ctrl-C; the same command resumes the sweep


if __name__ == "__main__":
    main()
