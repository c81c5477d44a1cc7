"""Serve an exported model (OpenAI API on Ray Serve): `python launch/serve.py serve.model_path=PATH [serve=gpu] ...`"""

from framework.cli import entry
from framework.serve.config import SERVE, ServeConfig


@entry(SERVE)
def main(serve: ServeConfig) -> None:
    from framework.serve.app import serve_model

    serve_model(serve)


if __name__ == "__main__":
    main()
