"""The `data` group's schema (`conf/data/*`), read by prep (`framework/data/prepare.py`), and its checks."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from framework.config import require

FORMATS = ("text", "jsonl", "parquet", "chat", "prompt_completion", "preference", "prompts")
# Formats whose records are conversations, rendered with a chat template, with targets on the assistant's tokens.
CHAT_FORMATS = ("chat", "prompt_completion", "preference")
# Preference pairs (TRL's shape: a prompt, a chosen and a rejected response), for preference losses (experiment=dpo):
# both responses rendered after the prompt, packed side by side in one row (framework/data/chat.py, shards.py).
PREFERENCE_FORMATS = ("preference",)
# Prompts with answers for reinforcement learning (experiment=grpo): a prompt (text or messages) and the fields its
# rewards read, rendered with the chat template and its generation prompt (framework/data/prompts.py).
PROMPT_FORMATS = ("prompts",)
# How rows are packed: `plain` rows carry no document boundaries (documents attend to each other, positions run
# on); `documents` rows store where each document starts: positions restart there and attention stays inside it.
PACKING = ("plain", "documents")
# Which assistant turns of a conversation are targets (with data.train_on_prompt=false).
ASSISTANT_TURNS = ("all", "last")
# A conversation longer than data.seq_len: dropped, or cut after its last whole assistant turn that fits.
OVERLONG = ("drop", "truncate")
# How a text file is cut into documents: whole, at blank lines, one per line, or before every line a regex matches.
SPLIT_ON = ("file", "blank_lines", "lines", "regex")


@dataclass
class SourceConfig:
    # A file, a directory (read recursively) or a glob (`**` allowed).
    # The one exception to "YAML holds every value": the items of a list. A source a user adds on the
    # command line (`+data.sources.1={path: ...}`) has no YAML to take its other keys from, so
    # these item defaults are the schema's (tests/test_config.py names this exception).
    path: str = MISSING
    format: str = "text"  # text | jsonl | parquet | chat | prompt_completion | preference
    # JSONL key or Parquet column holding the document text; chat: the JSONL key holding the messages.
    field: str = "text"
    # prompt_completion and preference: the JSONL key of the prompt (text: a user turn; preference: also a list of messages).
    prompt: str = "prompt"
    # prompt_completion only: the JSONL key of the completion (the assistant's answer).
    completion: str = "completion"
    # preference only: the JSONL keys of the preferred and the dispreferred response (text, or a list of assistant messages).
    chosen: str = "chosen"
    rejected: str = "rejected"
    # Text files only: where one document ends and the next begins (SPLIT_ON).
    split_on: str = "file"
    # With split_on=regex: a line matching it starts a new document (WikiText: '^ = [^=].* = $').
    split_regex: Optional[str] = None


@dataclass
class TokenizerConfig:
    # A local Hugging Face tokenizer folder; when null a byte-level BPE is trained on the train split.
    path: Optional[str] = MISSING
    vocab_size: int = MISSING
    min_frequency: int = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    sources: List[SourceConfig] = MISSING
    output_dir: str = MISSING
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = MISSING
    # A document goes to validation when the hash of its normalised content falls below this fraction.
    val_fraction: float = MISSING
    seed: int = MISSING
    # Each Ray task tokenises up to files_per_task files, or about mb_per_task megabytes of source:
    # a larger text, JSONL or Parquet file is cut (at document starts, lines, row groups) across tasks.
    files_per_task: int = MISSING
    mb_per_task: float = MISSING
    # PACKING: plain (today's pretraining rows) or documents (positions and attention restart at each document).
    packing: str = MISSING
    # A Jinja chat template written into the shards' tokenizer (and so into checkpoints and exports) and used to
    # render chat sources; null: the tokenizer's own.
    chat_template: Optional[str] = MISSING
    # Chat and prompt_completion sources only (null for text data): every non-padding token a target (true),
    # or only the assistant's turns and the end-of-turn token after each (false) ...
    train_on_prompt: Optional[bool] = MISSING
    # ... all of them, or the last one alone (ASSISTANT_TURNS) ...
    assistant_turns: Optional[str] = MISSING
    # ... and what happens to a conversation longer than seq_len (OVERLONG); both are counted in the manifest.
    overlong: Optional[str] = MISSING


def check_data(data: DataConfig) -> None:
    """The `data` rules a schema cannot express; raises ConfigError naming the first bad key."""
    require(data.seq_len >= 8, "data.seq_len", data.seq_len, "expected at least 8 tokens")
    require(0 < data.val_fraction < 1, "data.val_fraction", data.val_fraction, "expected a fraction in (0, 1): training evaluates on the validation split")
    require(data.files_per_task >= 1, "data.files_per_task", data.files_per_task, "expected at least 1")
    require(data.mb_per_task > 0, "data.mb_per_task", data.mb_per_task, "expected a positive number of megabytes")
    require(
        data.tokenizer.path is not None or data.tokenizer.vocab_size >= 256 + 1,
        "data.tokenizer.vocab_size", data.tokenizer.vocab_size, "expected more than 256 (the byte alphabet)",
    )
    require(data.packing in PACKING, "data.packing", data.packing, f"expected one of {PACKING}")
    chat = is_chat(data)
    for i, source in enumerate(data.sources):
        key = f"data.sources.{i}"
        require(source.format in FORMATS, f"{key}.format", source.format, f"expected one of {FORMATS}")
        require(
            (source.format in CHAT_FORMATS) == chat, f"{key}.format", source.format,
            f"a data set is either text or chat: data.sources.0.format={data.sources[0].format} "
            f"(chat formats: {', '.join(CHAT_FORMATS)}); prepare the two kinds under separate data.name",
        )
        require(
            (source.format in PROMPT_FORMATS) == is_prompts(data), f"{key}.format", source.format,
            f"a data set is either prompts (for experiment=grpo) or training text: data.sources.0.format={data.sources[0].format}; "
            "prepare the two kinds under separate data.name",
        )
        require(
            (source.format in PREFERENCE_FORMATS) == is_preference(data), f"{key}.format", source.format,
            f"a data set is either preference pairs or conversations: data.sources.0.format={data.sources[0].format}; "
            "prepare the two kinds under separate data.name",
        )
        for name, formats in (("prompt", ("prompt_completion", "preference", "prompts")), ("completion", ("prompt_completion",)),
                              ("chosen", PREFERENCE_FORMATS), ("rejected", PREFERENCE_FORMATS)):
            value = getattr(source, name)
            require(
                source.format in formats or value == SOURCE_DEFAULTS[name], f"{key}.{name}", value,
                f"names a field of {' and '.join(formats)} sources only (data.sources.N.format)",
            )
        require(source.split_on in SPLIT_ON, f"{key}.split_on", source.split_on, f"expected one of {SPLIT_ON}")
        require(
            source.format == "text" or source.split_on == "file", f"{key}.split_on", source.split_on,
            f"only text sources are split; a {source.format} source has one document per record (use split_on=file)",
        )
        require(
            (source.split_on == "regex") == (source.split_regex is not None), f"{key}.split_regex", source.split_regex,
            "expected a regex with split_on=regex, and null otherwise",
        )
        if source.split_regex is not None:
            try:
                re.compile(source.split_regex)
            except re.error as exc:
                require(False, f"{key}.split_regex", source.split_regex, f"not a valid regex ({exc})")
    if chat:
        require(data.train_on_prompt is not None, "data.train_on_prompt", None, "expected true or false for chat sources (data=chat sets it)")
        require(data.assistant_turns in ASSISTANT_TURNS, "data.assistant_turns", data.assistant_turns, f"expected one of {ASSISTANT_TURNS} for chat sources")
        require(data.overlong in OVERLONG, "data.overlong", data.overlong, f"expected one of {OVERLONG} for chat sources")
        require(
            not (data.train_on_prompt and data.assistant_turns == "last"), "data.assistant_turns", data.assistant_turns,
            "data.train_on_prompt=true makes every token a target; choose the last assistant turn with train_on_prompt=false",
        )
        if is_preference(data):
            # A preference loss compares the two responses: their tokens alone are targets, and neither may be cut.
            require(not data.train_on_prompt, "data.train_on_prompt", data.train_on_prompt,
                    "preference pairs train on the responses alone: expected false (data=preference)")
            require(data.overlong == "drop", "data.overlong", data.overlong,
                    "a preference pair is never cut (a cut response is not the one judged): expected drop")
            require(
                data.packing == "documents", "data.packing", data.packing,
                "preference pairs need data.packing=documents: the loss sums each response's log-probs by its segment",
            )
    else:
        if is_prompts(data):
            require(data.tokenizer.path is not None, "data.tokenizer.path", None,
                    "prompts are rendered with the policy model's own tokenizer and chat template: expected its folder")
        for name in ("train_on_prompt", "assistant_turns", "overlong"):
            value = getattr(data, name)
            require(
                value is None, f"data.{name}", value,
                f"applies to chat sources only (data.sources.0.format={data.sources[0].format if data.sources else None}): "
                "expected null, or data=chat",
            )


SOURCE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SourceConfig)}


def is_preference(data: DataConfig) -> bool:
    """Whether the data set is preference pairs (a prompt, a chosen and a rejected response)."""
    return bool(data.sources) and data.sources[0].format in PREFERENCE_FORMATS


def is_prompts(data: DataConfig) -> bool:
    """Whether the data set is prompts with answers (for reinforcement learning) rather than text to train on."""
    return bool(data.sources) and data.sources[0].format in PROMPT_FORMATS


def is_chat(data: DataConfig) -> bool:
    """Whether the data set is conversations (chat, prompt_completion sources) rather than text."""
    return bool(data.sources) and data.sources[0].format in CHAT_FORMATS
