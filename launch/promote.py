"""Promote a model: `python launch/promote.py promote.candidate=<folder | best.json> [promote=<gate>]`, or roll the
last promotion back: `python launch/promote.py rollback` (docs/evaluation.md).

The candidate is gated on its scores (eval.json) against the champion's; refused in one line naming the score and
both values (exit 1), or recorded in promote.record as the model to serve."""

import sys

from framework.cli import entry
from framework.promote.config import PROMOTE, PromoteRoot


@entry(PROMOTE)
def main(root: PromoteRoot) -> None:
    from framework.promote.job import run_promote

    run_promote(root)


if __name__ == "__main__":
    # `launch/promote.py rollback` / `check`: the action as a word, as in `kubectl rollout undo`.
    if len(sys.argv) > 1 and sys.argv[1] in ("rollback", "check"):
        sys.argv[1] = f"promote.action={sys.argv[1]}"
    main()
