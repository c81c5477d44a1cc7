"""Prompts with answers (`data.sources.N.format=prompts`): the data of reinforcement learning with verifiable rewards.

A record is a JSON object with a prompt under `data.sources.N.prompt` (text: one user turn; or a list of messages in
the OpenAI shape) and any other fields, the ground truth its rewards read (`answer`, test cases, ...; conf/reward/).
The prompt is rendered with the chat template and the generation prompt (`<|im_start|>assistant\\n`), its message
text tokenised as chat sources' is (framework/data/chat.py: ChatRenderer), and kept whole: a prompt longer
than `data.seq_len` is a bad record (`too_long`), counted like every bad record.

A shard row holds the rendered prompt's ids (`prompt_ids`, any length up to seq_len), the prompt as given (`prompt`,
JSON) and the record's other fields (`record`, JSON); rows are ordered, split and read back by row group as every
other data set (framework/data/sampler.py), so a run resumed at step k sees the prompts it would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import numpy as np
import pyarrow as pa

from framework.data.chat import BadRecord, checked_messages
from framework.data.shards import PROMPT, PROMPT_IDS, RECORD


@dataclass
class PromptRecord:
    messages: List[Dict[str, Any]]  # the prompt as messages (a text prompt: one user turn)
    prompt: Any                     # the prompt as the record gave it (text or messages)
    fields: Dict[str, Any]          # the record's other fields


def prompt_record(record: Any, source: Any) -> PromptRecord:
    """The PromptRecord of one record of a prompts `source`; raises BadRecord."""
    if not isinstance(record, dict):
        raise BadRecord("malformed", "not a JSON object")
    if source.prompt not in record:
        raise BadRecord("missing_field", f"no {source.prompt!r} key")
    raw = record[source.prompt]
    if isinstance(raw, str):
        messages = [{"role": "user", "content": raw}]
    else:
        messages = checked_messages(raw, source.prompt)
        if messages[-1]["role"] == "assistant":
            raise BadRecord("malformed", f"{source.prompt!r} ends with an assistant message: nothing is left to generate")
    return PromptRecord(messages, raw, {k: v for k, v in record.items() if k != source.prompt})


def prompt_text(record: PromptRecord) -> str:
    """What a prompt is known by (its split, duplicates): its messages as canonical JSON."""
    return json.dumps(record.messages, sort_keys=True, ensure_ascii=False)


def prompts_table(ids: Sequence[np.ndarray], records: Sequence[PromptRecord]) -> pa.Table:
    return pa.table({
        PROMPT_IDS: pa.array([np.asarray(i, dtype=np.int32) for i in ids], type=pa.list_(pa.int32())),
        PROMPT: pa.array([json.dumps(r.prompt, ensure_ascii=False) for r in records], type=pa.string()),
        RECORD: pa.array([json.dumps(r.fields, ensure_ascii=False) for r in records], type=pa.string()),
    })


@dataclass
class PromptRow:
    ids: List[int]
    prompt: Any
    fields: Dict[str, Any]


def prompt_rows(columns: Dict[str, np.ndarray]) -> List[PromptRow]:
    """The rows a ShardReader read from prompt shards (framework/data/stream.py), as PromptRows in the same order."""
    return [PromptRow(list(i), json.loads(p), json.loads(r)) for i, p, r in zip(columns[PROMPT_IDS], columns[PROMPT], columns[RECORD])]
