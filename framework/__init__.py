"""Train, sweep and serve language models on Ray from one Hydra config tree."""

import logging
import re

# transformers imports torchao (when installed) as soon as any model loads, and torchao's import logs
# warnings that say nothing to a user of this project: torch's pytree deprecation notice for the Enum
# classes torchao registers, and the CUDA-only C++ extensions of its wheel failing to load on a CPU
# machine. transformers imports DeepSpeed too, which says which accelerator it detected. They would
# break the one-line errors every entry point promises, so exactly those records are dropped, on the
# loggers that emit them; any other message of these libraries still shows.
_LIBRARY_NOISE = {
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
    "torchao": re.compile(r"^Failed to load .*/torchao/_C[^/]*\.so"),
    "DeepSpeed": re.compile(r"^Setting (ds_)?accelerator to "),
}


def _drop_library_noise(record: logging.LogRecord) -> bool:
    pattern = _LIBRARY_NOISE.get(record.name)
    return pattern is None or not pattern.search(record.getMessage())


for _name in _LIBRARY_NOISE:
    logging.getLogger(_name).addFilter(_drop_library_noise)
