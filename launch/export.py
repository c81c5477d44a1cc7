"""Export a training checkpoint as a verified Hugging Face folder:
`python launch/export.py export.checkpoint=RUN_OR_CHECKPOINT [export.output_dir=DIR] [export.dtype=bf16]`"""

from framework.cli import entry
from framework.export import EXPORT, ExportConfig


@entry(EXPORT)
def main(export: ExportConfig) -> None:
    from framework.export import export_checkpoint

    export_checkpoint(export.checkpoint, export.output_dir, dtype=export.dtype, max_shard_size=export.max_shard_size, adapter=export.adapter)


if __name__ == "__main__":
    main()
