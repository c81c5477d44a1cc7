"""Compress an exported model into a quantised Hugging Face folder, with its report:
`python launch/compress.py compress.model_path=FOLDER_OR_BEST_JSON [compress=int8|int8-dynamic|int4] [compress.output_dir=DIR]`"""

from omegaconf import DictConfig

from framework.config import hydra_entry
from framework.compress import check_compress


@hydra_entry(config_name="compress", check=check_compress)
def main(cfg: DictConfig) -> None:
    from framework.compress import run

    run(cfg)


if __name__ == "__main__":
    main()
