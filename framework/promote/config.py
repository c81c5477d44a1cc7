"""The `promote.*` schema (conf/promote.yaml, the gates of conf/promote/) and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING, DictConfig

from framework.config import Job, register, require, typed
from framework.tracking import TrackingConfig, check_tracking

ACTIONS = ("promote", "check", "rollback")


@dataclass
class GateConfig:
    """What a candidate must show against the champion, each score read from eval.json (framework/evaluation/)."""

    # score → the least it must be better by, in the score's own units (0: not worse; a score lower-is-better, such
    # as val/perplexity, must be lower by this much).
    metrics: Dict[str, float] = field(default_factory=dict)
    # score → the most it may be worse by (guard tasks: a gain elsewhere may not cost more than this here).
    guards: Dict[str, float] = field(default_factory=dict)
    # conf/eval.yaml overrides for scoring a model whose eval.json lacks a gate score (eval.model is set here).
    eval: List[str] = field(default_factory=list)


@dataclass
class PromoteConfig:
    """The `promote.*` keys: types here, values in conf/promote.yaml and the gate presets of conf/promote/."""

    name: str = MISSING  # the gate preset's name
    action: str = MISSING  # promote | check (the gate alone) | rollback (the previous model back)
    candidate: Optional[str] = MISSING  # a folder or a sweep's best.json
    # What the candidate is held against: a folder or its eval.json; null: the model the record says is serving.
    champion: Optional[str] = MISSING
    # The promotion record: the model promoted now and every one before it. Its `path` names the current folder,
    # so `launch/serve.py serve.model_path=<record>` serves it as it serves a best.json.
    record: str = MISSING
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class PromoteRoot:
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


register("promote_schema", PromoteRoot)


def check_promote(c: PromoteConfig) -> PromoteConfig:
    require(c.action in ACTIONS, "promote.action", c.action, f"expected one of {ACTIONS}")
    if c.action != "rollback":
        require(c.candidate is not None, "promote.candidate", None, "missing; expected a model folder or a sweep's best.json")
        require(bool(c.gate.metrics), "promote.gate.metrics", {}, "expected at least one score the candidate must improve")
    for group in ("metrics", "guards"):
        for name, margin in getattr(c.gate, group).items():
            require(math.isfinite(margin) and margin >= 0 if group == "guards" else math.isfinite(margin),
                    f"promote.gate.{group}.{name}", margin,
                    "expected 0 or more" if group == "guards" else "expected a finite number")
    return c


def load_promote(cfg: DictConfig) -> PromoteRoot:
    c: PromoteConfig = typed(PromoteConfig, cfg["promote"], "promote", example="outputs/export/RUN")
    tracking = typed(TrackingConfig, cfg["tracking"], "tracking")
    check_tracking(tracking)
    require(tracking.backend == "none" or bool(tracking.registered_model), "tracking.registered_model", None,
            "tracking=mlflow: name the registered model whose version carries the alias `champion`")
    return PromoteRoot(check_promote(c), tracking)


PROMOTE = Job("promote", load=load_promote)
