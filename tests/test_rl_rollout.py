"""GRPO's rollout engine on the real stack: vLLM's CPU build in a Ray actor, weights pushed to it as a trainer does.

One engine (LoRA-capable) for the module: after each weight sync its log-probs of a fixed sequence equal the
trainer's (transformers on the same weights), for full weights and for adapters; the log-probs it reports for the
tokens it samples are those of the distribution it sampled from (temperature applied), as the trainer recomputes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch

pytestmark = pytest.mark.slow

# fp32 on both sides; vLLM's CPU kernels (oneDNN GEMMs) sum in another order than torch's.
ATOL = 2e-4
TEXT = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"


@pytest.fixture(scope="module")
def base(exports: Dict[int, str]) -> Path:
    return Path(exports[3])


@pytest.fixture(scope="module")
def sequence(base: Path) -> List[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)(TEXT, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def engine(base: Path, ray_session):  # noqa: ANN001, ANN201
    from framework.rl.rollout import EngineSpec, start_engine

    actor = start_engine(EngineSpec(folder=str(base), num_cpus=1, num_gpus=0, kv_cache_gib=1, gpu_memory_utilization=0.5, dtype="auto",
                                    max_num_seqs=8, lora_rank=8))
    yield actor
    ray_session.kill(actor)


def _trainer_logprobs(model, ids: List[int], temperature: float = 1.0) -> torch.Tensor:  # noqa: ANN001
    """What the trainer computes: log-softmax of its logits (over the temperature) at each next token."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def _load(folder: Path):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_after_a_full_weight_sync_the_engine_scores_as_the_trainer(engine, base: Path, sequence: List[int], tmp_path: Path, ray_session) -> None:  # noqa: ANN001
    model = _load(base)
    before = torch.tensor(ray_session.get(engine.token_logprobs.remote([sequence]))[0])
    torch.testing.assert_close(before, _trainer_logprobs(model, sequence), atol=ATOL, rtol=0)

    # A trainer's step: every weight moves (far more than one optimiser step would).
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "step-1")
    assert ray_session.get(engine.load_weights.remote(str(tmp_path / "step-1"))) >= 1
    after = torch.tensor(ray_session.get(engine.token_logprobs.remote([sequence]))[0])
    expected = _trainer_logprobs(model, sequence)
    assert (expected - before).abs().max() > 0.05  # the weights changed what the model says...
    torch.testing.assert_close(after, expected, atol=ATOL, rtol=0)  # ...and the engine says it too


def test_sampled_tokens_carry_the_log_probs_of_the_distribution_they_were_sampled_from(engine, base: Path, sequence: List[int],
                                                                                       ray_session) -> None:  # noqa: ANN001
    ray_session.get(engine.load_weights.remote(str(base)))
    prompt, temperature = sequence[:12], 0.7
    groups = ray_session.get(engine.generate.remote([prompt], 3, 10, temperature, [1234]))
    assert len(groups) == 1 and len(groups[0]) == 3
    model = _load(base)
    for sample in groups[0]:
        assert len(sample.token_ids) == len(sample.logprobs) >= 1
        recomputed = _trainer_logprobs(model, prompt + sample.token_ids, temperature)[len(prompt) - 1:]
        torch.testing.assert_close(torch.tensor(sample.logprobs), recomputed, atol=ATOL, rtol=0)
    again = ray_session.get(engine.generate.remote([prompt], 3, 10, temperature, [1234]))
    assert [s.token_ids for s in again[0]] == [s.token_ids for s in groups[0]]  # seeded: the same samples


def test_after_an_adapter_sync_the_engine_scores_as_the_trainers_lora_model(engine, base: Path, sequence: List[int], tmp_path: Path,
                                                                          ray_session) -> None:  # noqa: ANN001
    from peft import LoraConfig, get_peft_model

    previous = None
    for version in (1, 2):
        torch.manual_seed(version)
        model = get_peft_model(_load(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                                       init_lora_weights=False))
        model.save_pretrained(tmp_path / f"adapter-{version}")
        ray_session.get(engine.load_weights.remote(str(tmp_path / f"adapter-{version}")))
        served = torch.tensor(ray_session.get(engine.token_logprobs.remote([sequence]))[0])
        expected = _trainer_logprobs(model.eval(), sequence)
        torch.testing.assert_close(served, expected, atol=ATOL, rtol=0)
        if previous is not None:
            assert (served - previous).abs().max() > 0.01  # the new adapters are in use, not the old
        previous = served

