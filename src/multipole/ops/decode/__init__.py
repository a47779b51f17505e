from .reference import attend_tokens, far_field, merge_states, softmax_partial

__all__ = ["attend_tokens", "far_field", "merge_states", "softmax_partial"]
