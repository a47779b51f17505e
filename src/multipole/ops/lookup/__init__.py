from .reference import (
    cluster_logits,
    log_importance,
    select_band,
    select_by_budget,
    take_by_budget,
)

__all__ = ["cluster_logits", "log_importance", "select_band", "select_by_budget", "take_by_budget"]
