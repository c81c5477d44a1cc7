"""Compress an exported model into a quantised Hugging Face folder, with its report:
`python launch/compress.py compress.model_path=FOLDER_OR_BEST_JSON [compress=int8|int8-dynamic|int4] [compress.output_dir=DIR]`"""

from framework.cli import entry
from framework.compress.plan import COMPRESS, CompressPlan


@entry(COMPRESS)
def main(plan: CompressPlan) -> None:
    from framework.compress.job import compress

    compress(plan)


if __name__ == "__main__":
    main()
