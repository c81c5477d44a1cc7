"""Serve an exported model (OpenAI API on Ray Serve LLM, vLLM): `python launch/serve.py serve.model_path=PATH [serve=gpu] ...`

Serves until SIGTERM or Ctrl-C, then drains the requests in flight (serve.drain_timeout_s) and exits 0 (SIGTERM)
or 130 (Ctrl-C)."""

import sys

from framework.cli import entry
from framework.serve.config import SERVE, ServeConfig


@entry(SERVE)
def main(serve: ServeConfig) -> None:
    from framework.serve.app import serve_model

    sys.exit(serve_model(serve))


if __name__ == "__main__":
    main()
