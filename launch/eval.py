"""Evaluate a model: `python launch/eval.py eval.model=<folder | best.json | http://host:port> [eval.tasks=[...]] ...`

Perplexity on the shards, lm-evaluation-harness tasks and chat task sets through the serving engine; the scores go
to eval.json beside the model, a table to the terminal, and with eval.compare a plot (docs/evaluation.md)."""

from framework.cli import entry
from framework.evaluation.config import EVAL, EvalPlan


@entry(EVAL)
def main(plan: EvalPlan) -> None:
    from framework.evaluation.job import run_eval

    run_eval(plan)


if __name__ == "__main__":
    main()
