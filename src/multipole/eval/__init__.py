"""Evaluation on real models: attention fidelity, teacher-forced decoding, generation tasks,
every method at equal bytes read (``multipole eval``)."""

from .decoding import Run, generate, teacher_forced
from .fidelity import AttentionInputs, attention_fidelity, capture_attention_inputs
from .harness import EvalSettings, format_table, method_config, run_eval

__all__ = [
    "AttentionInputs",
    "EvalSettings",
    "Run",
    "attention_fidelity",
    "capture_attention_inputs",
    "format_table",
    "generate",
    "method_config",
    "run_eval",
    "teacher_forced",
]
