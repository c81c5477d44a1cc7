"""The causal LM (`conf/model/*`): built from config with `transformers` or loaded from a local folder,
optionally wrapped with LoRA adapters (peft); its dtype, special tokens, context length, and FLOPs per
token for MFU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from omegaconf import MISSING

from framework.config import ConfigError, last_line, require
from framework.hf_folder import DTYPE_NAMES, max_positions

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

# torch and transformers are imported where they are used: composing and checking a job's config needs neither
# (a typo in an override fails in a second, not after the seconds their imports take).


@dataclass
class LoraConfig:
    """LoRA adapters (peft's LoraConfig): rank, scale alpha / r, dropout on the adapters' input, the modules adapted."""

    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    # Names (or name suffixes) of the linear layers to adapt: q_proj, v_proj, ... for Llama-style models.
    target_modules: List[str] = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    # Any `transformers` model_type (llama, gpt2, mistral, ...), built with AutoConfig.for_model;
    # or `pretrained`, which loads `pretrained_path` and requires it.
    arch: str = MISSING
    # Keyword arguments for the transformers config class; vocab_size comes from the tokenizer.
    hf_config: Dict[str, Any] = MISSING
    # A local Hugging Face model folder to fine-tune instead of building from `hf_config`.
    pretrained_path: Optional[str] = MISSING
    activation_checkpointing: bool = MISSING
    # LoRA adapters: only they train (the base is frozen, and checkpoints leave it out); null: every weight trains.
    lora: Optional[LoraConfig] = MISSING

# Dense bf16 peak TFLOP/s per GPU, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def hf_config(model: ModelConfig, vocab_size: int, special_ids: Dict[str, Optional[int]]) -> PretrainedConfig:
    """The transformers config: the pretrained folder's own, or `arch` + `hf_config` with the tokenizer's vocab."""
    from transformers import AutoConfig

    if model.pretrained_path:
        return AutoConfig.from_pretrained(model.pretrained_path, local_files_only=True)
    return AutoConfig.for_model(model.arch, vocab_size=vocab_size, **special_ids, **model.hf_config)


def build_model(model: ModelConfig, config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """The model in fp32 (DeepSpeed casts for mixed precision); the same seed gives the same weights on every rank."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if model.pretrained_path:
        net = AutoModelForCausalLM.from_pretrained(model.pretrained_path, local_files_only=True, dtype=torch.float32)
    else:
        net = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model.activation_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.config.use_cache = False  # no KV cache while training
    if model.lora is not None:
        net = with_lora(net, model.lora)
    return net


def with_lora(net: PreTrainedModel, lora: LoraConfig) -> Any:
    """`net` wrapped by peft with fresh LoRA adapters (B = 0: the wrapped model computes what `net` does); only they train."""
    from peft import get_peft_model

    return get_peft_model(net, peft_config(lora))


def peft_config(lora: LoraConfig) -> Any:
    """peft's LoraConfig for `model.lora`."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
    )


def trainable_params(net: torch.nn.Module) -> Tuple[int, int]:
    """(parameters that train, all parameters), full sizes under ZeRO-3 too."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in net.parameters() if p.requires_grad), count_params(net)


def dtype_named(name: str) -> torch.dtype:
    """One of framework/hf_folder.py's DTYPE_NAMES (fp32, bf16, fp16) as a torch dtype."""
    import torch

    return dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))[name]


def torch_dtype(precision: str, on_gpu: bool) -> torch.dtype:
    """A precision name (fp32, bf16, fp16, or auto: bf16 on a GPU, fp32 on the CPU) as a torch dtype."""
    return dtype_named(("bf16" if on_gpu else "fp32") if precision == "auto" else precision)


def pad_token_id(tokenizer: Any) -> Optional[int]:
    """The id batches are padded with: the tokenizer's pad token, or its end-of-sequence token when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def count_params(net: torch.nn.Module) -> int:
    # ds_numel holds the full size of a ZeRO-3 partitioned parameter.
    return sum(getattr(p, "ds_numel", p.numel()) for p in net.parameters())


def flops_per_token(net: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token, 6·N + 12·L·d·T (PaLM appendix B; nanoGPT's estimate_mfu).

    N counts the parameters that take part in matrix multiplies: the input embedding is a lookup,
    so it is left out unless it is tied to the output projection, which is a real matmul. A frozen
    parameter (LoRA's base) costs 4 FLOPs per token, not 6: forward and the input gradient, no weight gradient.
    """
    config = net.config
    n, trainable = count_params(net), trainable_params(net)[0]
    embeddings = net.get_input_embeddings()
    if not getattr(config, "tie_word_embeddings", False):
        n -= getattr(embeddings.weight, "ds_numel", embeddings.weight.numel())
    wpe = getattr(getattr(net, "transformer", None), "wpe", None)  # GPT-2 learned positions: a lookup too
    if wpe is not None:
        n -= getattr(wpe.weight, "ds_numel", wpe.weight.numel())
    frozen = max(0, n - trainable)
    layers = config.num_hidden_layers
    hidden = config.hidden_size
    return 6.0 * (n - frozen) + 4.0 * frozen + 12.0 * layers * hidden * seq_len


def peak_tflops(override: Optional[float]) -> Optional[float]:
    """Peak TFLOP/s of this worker's GPU, or None on CPU / an unknown GPU (then no MFU is reported)."""
    import torch

    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def special_token_ids(tokenizer: Any) -> Dict[str, Optional[int]]:
    """bos/eos/pad ids for the model config, so that `generate` stops at the end of a document."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_token_id(tokenizer),
    }


def check_model_config(model: ModelConfig, seq_len: int) -> PretrainedConfig:
    """The `model` rules a schema cannot express (arch, hf_config keys, a loadable folder, enough positions); gives its transformers config."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if model.pretrained_path is not None or model.arch == "pretrained":
        require(
            model.pretrained_path is not None and (Path(model.pretrained_path) / "config.json").is_file(),
            "model.pretrained_path", model.pretrained_path, f"expected a local Hugging Face model folder with config.json (model={model.name})",
        )
        config = AutoConfig.from_pretrained(model.pretrained_path, local_files_only=True)
    else:
        require(model.arch in CONFIG_MAPPING, "model.arch", model.arch, "expected a transformers model_type such as llama, gpt2 or mistral")
        known = set(CONFIG_MAPPING[model.arch]().to_dict())
        for key in model.hf_config:
            require(key in known, f"model.hf_config.{key}", model.hf_config[key], f"not a field of the {model.arch} config")
        try:
            config = CONFIG_MAPPING[model.arch](**model.hf_config)
        except Exception as exc:  # noqa: BLE001 - transformers validates its configs (heads must divide hidden_size, ...)
            raise ConfigError(f"model.hf_config: {last_line(exc)} (model={model.name})") from None
    positions = max_positions(config)
    require(positions is None or positions >= seq_len, "data.seq_len", seq_len, f"longer than the model's {positions} positions (model={model.name})")
    if model.lora is not None:
        check_lora(model.lora, config, model.name)
    return config


def check_lora(lora: LoraConfig, config: PretrainedConfig, name: str) -> None:
    """`model.lora` values, and target modules that name linear layers of the model (found on a weightless copy)."""
    require(lora.r >= 1, "model.lora.r", lora.r, "expected a rank of at least 1")
    require(lora.alpha > 0, "model.lora.alpha", lora.alpha, "expected a positive scale")
    require(0 <= lora.dropout < 1, "model.lora.dropout", lora.dropout, "expected a probability in [0, 1)")
    targets = list(lora.target_modules)
    require(bool(targets), "model.lora.target_modules", targets, "expected at least one module name (q_proj, v_proj, ...)")
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and n})
    for target in targets:
        require(
            target in linear, "model.lora.target_modules", targets,
            f"{target} is not a linear layer of the {config.model_type} model (model={name}; its linear layers: {', '.join(linear)})",
        )


# A fixed input whose logits fingerprint a model: a line of code (the tokenizer at work) and seeded random ids.
PROBE_TEXT = 'def fibonacci(n):\n    """The n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n'
PROBE_LEN = 32


def probe_ids(tokenizer: Any, config: PretrainedConfig) -> torch.Tensor:
    """Two rows of PROBE_LEN ids: the tokenized PROBE_TEXT (repeated to length) and seeded random ids."""
    import torch

    length = min(PROBE_LEN, max_positions(config) or PROBE_LEN)
    text = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"] or [0]
    row = (text * (length // len(text) + 1))[:length]
    random = torch.randint(config.vocab_size, (length,), generator=torch.Generator().manual_seed(0))
    return torch.stack([torch.tensor(row), random])
