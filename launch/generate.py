"""Batch generation through Ray Data LLM (vLLM), on the engine and folder serving uses:
`python launch/generate.py serve.model_path=PATH generate.input=prompts.jsonl generate.output=completions.parquet`"""

from framework.cli import entry
from framework.serve.generate import GENERATE, GeneratePlan


@entry(GENERATE)
def main(plan: GeneratePlan) -> None:
    from framework.serve.generate import generate

    counts = generate(plan)
    print(f"generate: {counts['rows']} rows → {plan.generate.output}: {counts['completed']} completed, "
          f"{counts['bad_records']} bad records, {counts['engine_failures']} failed in the engine", flush=True)


if __name__ == "__main__":
    main()
