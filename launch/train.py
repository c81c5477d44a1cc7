"""Train: `python launch/train.py [model=llama-125m] [deepspeed=zero3] [run.num_workers=4] [optim.lr=3e-4] ...`"""

from framework.cli import entry
from framework.train.config import TRAIN, TrainRoot


@entry(TRAIN)
def main(root: TrainRoot) -> None:
    from framework.train.trainer import train

    train(root)


if __name__ == "__main__":
    main()
