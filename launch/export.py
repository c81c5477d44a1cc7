"""Export a training checkpoint as a verified Hugging Face folder:
`python launch/export.py export.checkpoint=RUN_OR_CHECKPOINT [export.output_dir=DIR] [export.dtype=bf16]`"""

from framework.cli import entry
from framework.export import EXPORT, ExportRoot


@entry(EXPORT)
def main(root: ExportRoot) -> None:
    from framework.export import export_checkpoint

    e = root.export
    export_checkpoint(e.checkpoint, e.output_dir, dtype=e.dtype, max_shard_size=e.max_shard_size, adapter=e.adapter,
                      tracking=root.tracking)


if __name__ == "__main__":
    main()
