"""The gate: a candidate's scores against the champion's, each in its own direction (eval.json says which is better)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from framework.config import RunError
from framework.promote.config import GateConfig


@dataclass
class Check:
    score: str
    kind: str  # "metric" (must gain at least `margin`) or "guard" (may lose at most `margin`)
    margin: float
    candidate: float
    champion: float
    higher_is_better: bool

    @property
    def gain(self) -> float:
        """How much better the candidate is, in the score's units (negative: worse)."""
        diff = self.candidate - self.champion
        return diff if self.higher_is_better else -diff

    @property
    def passed(self) -> bool:
        return self.gain >= self.margin if self.kind == "metric" else self.gain >= -self.margin

    def why(self) -> str:
        direction = "higher" if self.higher_is_better else "lower"
        need = (f"must be {direction} by at least {self.margin:g}" if self.kind == "metric"
                else f"may be worse by at most {self.margin:g}")
        return (f"{self.score}: candidate {self.candidate:.6g} vs champion {self.champion:.6g} ({direction} is better; "
                f"{need}; the change is {self.gain:+.6g})")


def missing(gate: GateConfig, scores: Dict[str, Any]) -> List[str]:
    """The gate's scores an eval.json lacks."""
    return [name for name in [*gate.metrics, *gate.guards] if name not in scores]


# What makes two scores of one name comparable: the same data (shards or task file), documents, task version and shots.
SAME = ("source", "count", "version", "n_shot")


def incomparable(name: str, ours: Dict[str, Any], theirs: Dict[str, Any]) -> Optional[str]:
    """Why the candidate's and the champion's `name` were not measured the same way; None if they were."""
    for key in SAME:
        if ours.get(key) != theirs.get(key):
            return f"{name} was measured differently: {key} {ours.get(key)!r} for the candidate, {theirs.get(key)!r} for the champion"
    return None


def judge(gate: GateConfig, candidate: Dict[str, Any], champion: Optional[Dict[str, Any]]) -> List[Check]:
    """Every check of the gate (none without a champion: the first model promoted has nothing to beat)."""
    if champion is None:
        return []
    checks = []
    for kind, margins in (("metric", gate.metrics), ("guard", gate.guards)):
        for name, margin in margins.items():
            ours, theirs = candidate[name], champion[name]
            why = incomparable(name, ours, theirs)
            if why is not None:
                raise RunError(f"promote.gate: {why}; evaluate both the same way (promote.gate.eval)")
            checks.append(Check(name, kind, float(margin), float(ours["value"]), float(theirs["value"]),
                                bool(ours.get("higher_is_better", True))))
    return checks
