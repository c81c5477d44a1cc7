"""Batched generation with a KV cache: the rows of many requests decoded together, one token per step.

A batch is left-padded so that every row's next token sits in the last column; `position_ids` count
only real tokens, so a padded row sees the same positions it would alone. Each step runs one forward
pass over the active rows with `past_key_values`, then samples every row with its own parameters and
its own `torch.Generator`. A row that finishes (eos, a stop string, max_tokens) or whose request was
cancelled is dropped from the batch and the cache, so it receives no more tokens and costs nothing.
A request whose row cannot be set up or sampled ends alone (`JobFailed`); the batch goes on without it.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

logger = logging.getLogger(__name__)

# Temperatures below this decode greedily: dividing logits by less can overflow them to inf, and
# sampling that sharp is greedy decoding anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5

# Without a chat template, messages are laid out as "role: content" lines and the model continues
# after "assistant:"; it stops where it would start the next user or system turn.
FALLBACK_ROLE_FORMAT = "{role}: {content}\n"
FALLBACK_GENERATION_PROMPT = "assistant:"
FALLBACK_STOPS = ("\nuser:", "\nsystem:")


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # below GREEDY_BELOW_TEMPERATURE (0, say) is greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: Optional[int] = None  # null draws a fresh seed; torch takes [-2**63, 2**64)
    stop_token_ids: Sequence[int] = ()  # ends the row like eos (a chat template's end-of-turn token)


@dataclass
class Row:
    """One sequence to generate: a prompt and how to sample its continuation."""

    prompt_ids: List[int]
    params: SamplingParams


@dataclass
class Job:
    """One HTTP request's rows (prompts × n); `cancelled` lets the request drop them mid-batch."""

    rows: List[Row]
    cancelled: bool = False


@dataclass
class Delta:
    """What one step gives one row: new text (maybe empty), the tokens it cost, and why it ended."""

    index: int  # the row's position in its Job
    text: str
    tokens: int
    finish_reason: Optional[str] = None  # "stop" | "length" | None while running


@dataclass
class JobFailed:
    """A job ended by an error in one of its rows (setting up its sampler, or sampling); the others go on."""

    error: Exception


# Per job: its deltas, JobFailed once, or StopIteration once it is done.
StepOutput = List[Union[List[Delta], JobFailed, type]]


class TextTracker:
    """Turns a row's tokens into text deltas, holding back what might still become a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: SamplingParams, eos_ids: frozenset) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.eos_ids = eos_ids | frozenset(params.stop_token_ids)
        self.ids: List[int] = []
        self.count = 0
        self.emitted = 0  # characters of the decoded text already sent

    def push(self, token: int) -> Tuple[str, Optional[str]]:
        """Add one sampled token; give the text now safe to send and the finish reason, if any."""
        self.count += 1
        if token in self.eos_ids:
            return self._rest(self._text()), "stop"
        self.ids.append(token)
        # Decoding the whole continuation (not token by token) keeps multi-byte characters and merges right.
        text = self._text()
        hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            return self._rest(text[: min(hits)]), "stop"
        if self.count >= self.params.max_tokens:
            return self._rest(text), "length"
        safe = len(text) - self._held_back(text)
        delta = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, None

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _rest(self, text: str) -> str:
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` not yet safe: a partial UTF-8 character, or a stop string's prefix."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held


class Engine:
    """A causal LM and its tokenizer on one device, ready to decode batches of rows."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        self.pad_id = int(pad)
        config = model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        )
        self.vocab_size = int(config.vocab_size)

    # -- prompts ---------------------------------------------------------------------------------

    def encode(self, text: str) -> List[int]:
        """Token ids of a completion prompt, with the special tokens the tokenizer adds (BOS, say)."""
        return self.tokenizer(text)["input_ids"]

    def chat_prompt(self, messages: List[Dict[str, str]]) -> Tuple[List[int], Tuple[str, ...], Tuple[int, ...]]:
        """Token ids of a chat, laid out by the tokenizer's chat template, or by the documented fallback.

        Also gives what ends the assistant's turn in that layout: stop strings (the fallback's next-turn
        markers) and stop token ids (the template's end-of-turn token, e.g. ChatML's <|im_end|>).
        """
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"], (), self.turn_end_ids
        text = "".join(FALLBACK_ROLE_FORMAT.format(**m) for m in messages) + FALLBACK_GENERATION_PROMPT
        return self.encode(text), FALLBACK_STOPS, ()

    @functools.cached_property
    def turn_end_ids(self) -> Tuple[int, ...]:
        """The added token the template writes right after an assistant message, if there is one."""
        probe = "\x00probe\x00"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": probe}], tokenize=False
            )
        except Exception:  # noqa: BLE001 - a template that insists on other roles: no end-of-turn token known
            return ()
        tail = text.split(probe, 1)[-1] if probe in text else ""
        ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        added = set(self.tokenizer.get_added_vocab().values())
        return (ids[0],) if ids and ids[0] in added else ()

    # -- decoding --------------------------------------------------------------------------------

    @torch.inference_mode()
    def check(self) -> None:
        """Raise unless a one-token forward pass gives finite logits: the device and the weights still work."""
        ids = torch.tensor([[self.pad_id]], device=self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError(f"engine check: a forward pass on {self.device} gave non-finite logits")

    def start(self, jobs: List[Job]) -> "DecodeBatch":
        return DecodeBatch(self, jobs)


@dataclass
class _Active:
    job: int
    index: int
    tracker: TextTracker
    warpers: LogitsProcessorList
    generator: Optional[torch.Generator]
    greedy: bool


@dataclass
class DecodeBatch:
    """The rows of a set of jobs being decoded together; `step()` advances all of them by one token."""

    engine: Engine
    jobs: List[Job]
    rows: List[_Active] = field(default_factory=list)
    remaining: List[int] = field(default_factory=list)  # rows still running, per job
    reported: List[bool] = field(default_factory=list)  # job's StopIteration (or JobFailed) sent
    failed: Dict[int, Exception] = field(default_factory=dict)  # jobs whose failure is still to be sent
    cache: object = None
    mask: Optional[torch.Tensor] = None  # [rows, columns so far]
    positions: Optional[torch.Tensor] = None  # [rows] position of each row's next token
    last: Optional[torch.Tensor] = None  # [rows] each row's last sampled token

    def __post_init__(self) -> None:
        self._prompts = []
        for j, job in enumerate(self.jobs):
            try:
                active = [self._activate(j, i, row) for i, row in enumerate(job.rows)]
            except Exception as exc:  # noqa: BLE001 - one request's bad parameters must not end the others
                self._fail(j, exc)
                continue
            self.rows += active
            self._prompts += [row.prompt_ids for row in job.rows]
        self.remaining = [0 if j in self.failed else len(job.rows) for j, job in enumerate(self.jobs)]
        self.reported = [False] * len(self.jobs)

    def _activate(self, job: int, index: int, row: Row) -> _Active:
        """A row's decoding state: its text tracker and, unless greedy, its warpers and seeded generator."""
        p, engine = row.params, self.engine
        greedy = p.temperature < GREEDY_BELOW_TEMPERATURE
        generator, warpers = None, LogitsProcessorList()
        if not greedy:
            seed = p.seed if p.seed is not None else random.SystemRandom().randrange(2**63)
            generator = torch.Generator(device=engine.device).manual_seed(seed)
            warpers.append(TemperatureLogitsWarper(p.temperature))
            if p.top_p < 1.0:
                warpers.append(TopPLogitsWarper(p.top_p))
        return _Active(job, index, TextTracker(engine.tokenizer, p, engine.eos_ids), warpers, generator, greedy)

    def _fail(self, job: int, exc: Exception) -> None:
        logger.warning("request ended by an error in one of its rows (%s: %s); the batch goes on", type(exc).__name__, exc)
        self.failed.setdefault(job, exc)

    @property
    def done(self) -> bool:
        return all(self.reported)

    @torch.inference_mode()
    def step(self) -> StepOutput:
        """One forward pass and one sampled token per active row; gives each job its deltas."""
        out: StepOutput = [[] for _ in self.jobs]
        self._drop_cancelled()
        if self.rows:
            logits = self._prefill() if self.cache is None else self._decode()
            finished, tokens = [], []
            greedy = logits.argmax(-1).tolist()  # one device sync for every greedy row
            for b, row in enumerate(self.rows):
                token = self.engine.pad_id  # a failed job's rows leave the batch below; their token is never used
                if row.job not in self.failed:
                    try:
                        token = greedy[b] if row.greedy else self._sample(logits[b : b + 1], row)
                        text, reason = row.tracker.push(token)
                    except Exception as exc:  # noqa: BLE001 - this row's request ends; the batch goes on
                        self._fail(row.job, exc)
                    else:
                        out[row.job].append(Delta(row.index, text, 1, reason))
                        if reason is not None:
                            finished.append(b)
                            self.remaining[row.job] -= 1
                tokens.append(token)
            self.last = torch.tensor(tokens, device=self.engine.device)
            done = set(finished)
            self._keep([b for b, row in enumerate(self.rows) if b not in done and row.job not in self.failed])
        for j in range(len(self.jobs)):
            if j in self.failed and not self.reported[j]:
                out[j], self.reported[j], self.remaining[j] = JobFailed(self.failed[j]), True, 0
            # A job ends one step after its last delta, so that its final text reaches the caller first.
            elif self.remaining[j] == 0 and not out[j] and not self.reported[j]:
                out[j], self.reported[j] = StopIteration, True
            elif self.reported[j]:
                out[j] = StopIteration
        return out

    def _prefill(self) -> torch.Tensor:
        device, pad = self.engine.device, self.engine.pad_id
        width = max(len(p) for p in self._prompts)
        ids = torch.full((len(self._prompts), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(self._prompts), width), dtype=torch.long, device=device)
        for b, prompt in enumerate(self._prompts):
            ids[b, width - len(prompt) :] = torch.tensor(prompt, device=device)
            mask[b, width - len(prompt) :] = 1
        # Left padding: a row's first real token is position 0, as it would be alone.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.engine.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
        self.cache, self.mask, self.positions = out.past_key_values, mask, position_ids[:, -1] + 1
        return out.logits[:, -1, :].float()

    def _decode(self) -> torch.Tensor:
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=-1)
        out = self.engine.model(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache, self.positions = out.past_key_values, self.positions + 1
        return out.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor, row: _Active) -> int:
        scores = row.warpers(None, logits)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _drop_cancelled(self) -> None:
        keep = []
        for b, row in enumerate(self.rows):
            if self.jobs[row.job].cancelled:
                self.remaining[row.job] -= 1
            else:
                keep.append(b)
        if len(keep) < len(self.rows):
            self._keep(keep)

    def _keep(self, keep: List[int]) -> None:
        """Shrink the batch (rows, mask, positions, KV cache) to the rows in `keep`."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[b] for b in keep]
        if self.cache is None:  # before prefill: only the prompts
            self._prompts = [self._prompts[b] for b in keep]
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.engine.device)
        if keep:
            self.cache.batch_select_indices(index)
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]


def load_engine(folder: Path, dtype: str = "auto", device: Optional[str] = None) -> Engine:
    """Load a Hugging Face model folder onto `device` (default: cuda when there is one) in `dtype`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _DTYPES[dtype] if dtype != "auto" else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True).to(device).eval()
    try:
        generation = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except OSError:  # no generation_config.json: the model config's own ids
        generation = GenerationConfig.from_model_config(model.config)
    return Engine(model, tokenizer, generation)
