"""The evaluation stage (launch/eval.py): perplexity, lm-evaluation-harness tasks and chat sets, scored through the serving engine into eval.json."""
