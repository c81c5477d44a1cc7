"""Prepare token shards: `python launch/prep.py [data=stdlib] [data.seq_len=512] ...`"""

from omegaconf import DictConfig

from framework.config import hydra_entry
from framework.data.prepare import check_prep


@hydra_entry(check=check_prep)
def main(cfg: DictConfig) -> None:
    from framework.data.prepare import run

    from framework.schema import to_config

    run(to_config(cfg))


if __name__ == "__main__":
    main()
