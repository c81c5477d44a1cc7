"""Sweep: `python launch/tune.py [tune=asha|grid|optuna|pbt] [tune.name=...] [+tune.space.optim.lr='"tag(log, interval(1e-4, 3e-3))"'] [experiment=smoke] ...`"""

from omegaconf import DictConfig

from framework.config import hydra_entry
from framework.tune.plan import DEFAULT_GROUPS, check


@hydra_entry("config", check=check, default_groups=DEFAULT_GROUPS)
def main(cfg: DictConfig) -> None:
    from framework.tune.plan import plan_from_hydra
    from framework.tune.runner import run

    if run(plan_from_hydra(cfg)).interrupted:
        raise SystemExit(130)  # as a shell reports Ctrl-C; the same command resumes the sweep


if __name__ == "__main__":
    main()
