"""Train: `python launch/train.py [model=llama-125m] [deepspeed=zero3] [run.num_workers=4] [optim.lr=3e-4] ...`"""

from omegaconf import DictConfig

from framework.config import hydra_entry


@hydra_entry()
def main(cfg: DictConfig) -> None:
    from framework.train.trainer import run

    from framework.schema import to_config

    run(to_config(cfg))


if __name__ == "__main__":
    main()
