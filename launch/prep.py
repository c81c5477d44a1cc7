"""Prepare token shards: `python launch/prep.py [data=stdlib] [data.seq_len=512] ...`"""

from framework.cli import entry
from framework.train.config import PREP, TrainRoot


@entry(PREP)
def main(root: TrainRoot) -> None:
    from framework.data.prepare import prepare_shards

    prepare_shards(root.data, root.run.ray_address, root.tracking)


if __name__ == "__main__":
    main()
