"""Serve an exported model (OpenAI API on Ray Serve): `python launch/serve.py serve.model_path=PATH [serve=gpu] ...`"""

from omegaconf import DictConfig

from framework.config import hydra_entry
from framework.serve.config import check_serve_config


@hydra_entry(config_name="serve", check=check_serve_config)
def main(cfg: DictConfig) -> None:
    from framework.serve.app import run

    run(cfg)


if __name__ == "__main__":
    main()
