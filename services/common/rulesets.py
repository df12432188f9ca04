"""The rule set that guards a set of active model versions (champion first).

Shared by the validator (which checks events.raw against it) and the query API.
"""

from __future__ import annotations

from collections.abc import Sequence

from scoremesh.contract.featurespec import RuleSet
from services.common.model_version import ModelVersion
from services.common.registry_view import RegistryState


def rule_set_version(active: Sequence[ModelVersion]) -> str:
    """``name@version#gN`` of the champion, then ``+name@version`` per challenger."""
    return active[0].rule_set + "".join(f"+{v.key}" for v in active[1:])


def active_rule_set(state: RegistryState, model: str) -> RuleSet | None:
    """The rule set for a model's active versions, or None while it has no champion."""
    active = state.active(model)
    if not active or active[0].stage != "champion":
        return None
    return RuleSet([v.feature_spec for v in active], rule_set_version(active))
