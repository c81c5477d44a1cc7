"""Tokenizers: train a byte-level BPE with `tokenizers`, or load a local Hugging Face one."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from framework.config import ConfigError
from framework.data.config import TokenizerConfig

EOS_TOKEN = "<|endoftext|>"
# ChatML, so that chat requests to a model trained from scratch have a defined format.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`; decoding round-trips any text exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS_TOKEN, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """A local Hugging Face tokenizer folder; it must define an end-of-sequence token for packing."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.tokenizer.path={path}: not a loadable tokenizer folder ({exc})") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"data.tokenizer.path={path}: the tokenizer has no eos_token to separate documents")
    return tokenizer
