"""Artefacts that tests and benchmarks share when no trained export is at hand: a random-weight Llama folder.

Imported by tests/ and framework/bench/ only (the import contracts say so).
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List

from omegaconf import MISSING


@dataclass
class RandomModelConfig:
    """A random-weight Llama and a byte-level BPE trained on stdlib sources, for when no export is at hand."""

    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    tie_word_embeddings: bool = MISSING
    context: int = MISSING
    # Megabytes of stdlib source the BPE is trained on (enough text to reach vocab_size merges).
    corpus_mb: float = MISSING
    seed: int = MISSING


def _stdlib_sources(megabytes: float) -> List[str]:
    """Stdlib .py files (top level, then one level down) up to `megabytes`, skipping any that are not UTF-8."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py")) + sorted(p for p in stdlib.glob("*/*.py") if "site-packages" not in p.parts)
    chosen, size = [], 0
    for path in files:
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chosen.append(str(path))
        size += path.stat().st_size
        if size >= megabytes * 1e6:
            break
    return chosen


def random_model_folder(out: Path, model: RandomModelConfig) -> Path:
    """Write a Hugging Face folder (safetensors, tokenizer, generation config) holding a random Llama."""
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train(_stdlib_sources(model.corpus_mb), trainers.BpeTrainer(
        vocab_size=model.vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    torch.manual_seed(model.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=model.hidden_size, intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads, tie_word_embeddings=model.tie_word_embeddings,
        max_position_embeddings=model.context, bos_token_id=eos, eos_token_id=eos,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos).save_pretrained(out)
    return out
