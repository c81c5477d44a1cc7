"""Export a training checkpoint as a verified Hugging Face folder:
`python launch/export.py export.checkpoint=RUN_OR_CHECKPOINT [export.output_dir=DIR] [export.dtype=bf16]`"""

from omegaconf import DictConfig

from framework.config import hydra_entry
from framework.export import check_export


@hydra_entry(config_name="export", check=check_export)
def main(cfg: DictConfig) -> None:
    from framework.export import run

    run(cfg)


if __name__ == "__main__":
    main()
