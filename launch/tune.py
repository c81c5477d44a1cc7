"""Sweep: `python launch/tune.py [tune=asha|grid|optuna|pbt] [tune.name=...] [+tune.space.optim.lr='"loguniform(1e-4,3e-3)"'] [experiment=smoke] ...`"""

from omegaconf import DictConfig

from framework.config import hydra_entry
from framework.tune.sweep import check_sweep, register_sweep_schema, sweep_from_hydra

register_sweep_schema()


@hydra_entry("tune", check=check_sweep)
def main(cfg: DictConfig) -> None:
    from framework.tune.runner import run

    if run(sweep_from_hydra(cfg)).interrupted:
        raise SystemExit(130)  # as a shell reports Ctrl-C; the same command resumes the sweep


if __name__ == "__main__":
    main()
