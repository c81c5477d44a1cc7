"""The quantisation methods `compress.method` names (one preset each in conf/compress/): torchao configs and what each needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from framework.config import Registry
from framework.hf_folder import DTYPE_NAMES

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Method:
    """A torchao quantisation: its config, and what it needs of the machine and the model's layers."""

    build: Callable[[Optional[int]], Any]  # group_size → the torchao config
    devices: Tuple[str, ...]
    dtypes: Tuple[str, ...]
    group_sizes: Optional[Tuple[int, ...]]  # None: compress.group_size must be null; () any size dividing the inputs


def _int8_weight_only(group_size: Optional[int]) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig, PerGroup, PerRow

    # set_inductor_config=False: nothing here compiles, and loading the folder should not retune the inductor.
    return Int8WeightOnlyConfig(granularity=PerGroup(group_size) if group_size else PerRow(), set_inductor_config=False)


def _int8_dynamic(group_size: Optional[int]) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


def _int4_weight_only(group_size: Optional[int]) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)


METHODS: Registry[Method] = Registry("compress.method")
METHODS.register("int8_weight_only")(Method(_int8_weight_only, DEVICES, DTYPE_NAMES, ()))
METHODS.register("int8_dynamic")(Method(_int8_dynamic, DEVICES, DTYPE_NAMES, None))
# torchao's tinygemm layout: bf16 activations, groups of 32-256 inputs, CUDA only (its CPU variant is not in 0.18).
METHODS.register("int4_weight_only")(Method(_int4_weight_only, ("cuda",), ("bf16",), (32, 64, 128, 256)))




def torchao_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:
        return "(not installed)"
