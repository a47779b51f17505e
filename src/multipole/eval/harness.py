"""``multipole eval``: every method at equal bytes read, on a real model.

For a model, methods and a grid of read fractions (bytes read over dense KV bytes, centroid
and page-metadata bytes counted), up to four tasks:

- ``fidelity``: each layer's decode attention against dense on queries, keys and values
  captured from held-out text (relative L2 error, attention mass captured);
- ``perplexity``: teacher-forced decoding after a dense prefill (perplexity, KL(dense || method)
  of the next-token distributions, both against position);
- ``retrieval``: RULER-style needle tasks, greedy answers scored by exact match, plus token
  agreement with dense;
- ``gsm``: chain-of-thought answers to gsm_symbolic problems, accuracy and agreement with dense.

Writes ``summary.json`` (settings, versions, device, command line, metrics), ``samples.jsonl``
(one line per sample and run) and PNG plots into the output folder; prints a summary table.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..baselines import budget_for_read_fraction
from ..config import MultipoleConfig
from .decoding import Run, generate, teacher_forced
from .fidelity import attention_fidelity, capture_attention_inputs

TASKS = ("fidelity", "perplexity", "retrieval", "gsm")
METHODS = (
    "multipole",
    "multipole_partial",
    "multipole_2level",
    "centroid_only",
    "quest",
    "oracle_topk",
    "window",
)
# Eval methods that are a baseline method with a fixed variant of the config.
VARIANT_OF = {"multipole_2level": "multipole", "multipole_partial": "multipole"}
# far_field_share of multipole_partial: the best of 0.05 / 0.1 / 0.25 at 1/16 and at 1/32
# (benchmarks/experiment_partial_far_field.py, Qwen2.5-0.5B, 16K, teacher-forced KL)
PARTIAL_FAR_FIELD_SHARE = 0.05
RETRIEVAL_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
# Short contexts need a short recent window to reach small read fractions.
EVAL_BASE = MultipoleConfig(sink_tokens=4, interval=32, block_size=8192)


@dataclass
class EvalSettings:
    """What ``multipole eval`` runs (the defaults are the small SmolLM2 grid).

    Attributes:
        context: tokens of dense prefill (fidelity, perplexity) and retrieval prompt length.
        decode_tokens: teacher-forced tokens decoded after the prefill.
        windows: text windows (a batch) for fidelity and perplexity.
        fidelity_steps: decode steps replayed per window for attention fidelity.
        metadata_share: share of a method's bytes spent on centroids or page summaries; sets
            ``centroid_ratio = min(1/16, share * fraction)`` (the rest buys exact tokens).
    """

    tasks: tuple[str, ...] = ("fidelity", "perplexity", "retrieval")
    methods: tuple[str, ...] = METHODS
    fractions: tuple[float, ...] = (1 / 64, 1 / 32, 1 / 16, 1 / 8)
    context: int = 4096
    decode_tokens: int = 2048
    windows: int = 2
    fidelity_steps: int = 128
    retrieval_tasks: tuple[str, ...] = RETRIEVAL_TASKS
    retrieval_samples: int = 4
    retrieval_new_tokens: int = 24
    gsm_samples: int = 8
    gsm_new_tokens: int = 320
    metadata_share: float = 0.5
    position_free_keys: bool = False
    seed: int = 0
    base: MultipoleConfig = field(default_factory=lambda: EVAL_BASE)


def method_config(
    method: str, fraction: float, seq_len: int, head_dim: int, settings: EvalSettings
) -> MultipoleConfig | None:
    """The config that makes ``method`` read ``fraction`` of the dense bytes of a
    ``seq_len``-token sequence; None where the sink and window alone read more.

    ``multipole_2level`` is the two-level hierarchy: coarse centroids (1/128 of the tokens)
    scored everywhere, fine ones (1/16) only under the coarse clusters covering
    ``4 * fraction`` of the tokens (the best of a small grid on SmolLM2 fidelity at 1/16);
    ``multipole_partial`` keeps the far field to the ``PARTIAL_FAR_FIELD_SHARE`` of the
    clusters of largest estimated mass, the value-centroid bytes saved buying exact tokens."""
    base = dataclasses.replace(settings.base, position_free_keys=settings.position_free_keys)
    if method == "multipole_2level":
        base = dataclasses.replace(
            base,
            levels=2,
            centroid_ratio=1 / 16,
            level_ratio=1 / 8,
            coarse_budget=min(0.5, 4 * fraction),
        )
    else:
        base = dataclasses.replace(
            base, centroid_ratio=min(1 / 16, settings.metadata_share * fraction)
        )
        if method == "multipole_partial":
            base = dataclasses.replace(base, far_field_share=PARTIAL_FAR_FIELD_SHARE)
    try:
        return budget_for_read_fraction(
            VARIANT_OF.get(method, method),
            fraction,
            seq_len=seq_len,
            head_dim=head_dim,
            config=base,
        )
    except ValueError:
        return None


def runs_for(settings: EvalSettings, seq_len: int, head_dim: int) -> tuple[list[Run], list[str]]:
    """Every (method, fraction) run, and notes on the combinations that cannot be reached."""
    runs, skipped = [], []
    for fraction in settings.fractions:
        for method in settings.methods:
            config = method_config(method, fraction, seq_len, head_dim, settings)
            if config is None:
                skipped.append(f"{method} @ 1/{round(1 / fraction)}: fixed reads exceed it")
                continue
            runs.append(Run(label_of(method, fraction), VARIANT_OF.get(method, method), config))
    return runs, skipped


def label_of(method: str, fraction: float) -> str:
    return f"{method}@1/{round(1 / fraction)}"


def run_eval(
    model,
    tokenizer,
    settings: EvalSettings,
    out_dir: Path,
    *,
    windows: list[list[int]] | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> dict:
    """Run ``settings.tasks`` and write the outputs into ``out_dir``; returns the summary.

    ``windows`` (token ids, ``context + decode_tokens`` or longer) replace the essay windows
    (tests pass synthetic ones)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    head_dim = (
        model.config.head_dim
        if getattr(model.config, "head_dim", None)
        else (model.config.hidden_size // model.config.num_attention_heads)
    )
    runs, skipped = runs_for(settings, settings.context, head_dim)
    summary: dict = {
        "settings": dataclasses.asdict(settings),
        "model": model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "environment": environment(device),
        "skipped": skipped,
        "tasks": {},
    }
    samples_path = out_dir / "samples.jsonl"
    samples_path.write_text("")

    need_text = {"fidelity", "perplexity"} & set(settings.tasks)
    if need_text and windows is None:
        from ..data import text_windows

        windows = text_windows(
            tokenizer,
            settings.context + settings.decode_tokens + 1,
            settings.windows,
            seed=settings.seed,
        )
    bar = _progress(progress)
    if "fidelity" in settings.tasks:
        ids = _tensor(windows, settings.context + settings.fidelity_steps, device)
        summary["tasks"]["fidelity"] = fidelity_task(model, ids, runs, settings, bar)
    if "perplexity" in settings.tasks:
        ids = _tensor(windows, settings.context + settings.decode_tokens + 1, device)

        def save_partial(metrics: dict) -> None:  # kept if the run is stopped
            summary["tasks"]["perplexity"] = metrics
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))

        summary["tasks"]["perplexity"] = perplexity_task(
            model, ids, runs, settings, bar, save_partial
        )
    if "retrieval" in settings.tasks:
        summary["tasks"]["retrieval"] = retrieval_task(
            model, tokenizer, runs, settings, samples_path, bar
        )
    if "gsm" in settings.tasks:
        summary["tasks"]["gsm"] = gsm_task(model, tokenizer, head_dim, settings, samples_path, bar)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out_dir)
    return summary


# ----------------------------------------------------------------------------- tasks
def fidelity_task(model, ids, runs: list[Run], settings: EvalSettings, bar) -> dict:
    inputs = capture_attention_inputs(model, ids)
    results = {}
    for run in bar(runs, desc="fidelity"):
        fid = attention_fidelity(inputs, run.method, run.config, settings.context)
        results[run.label] = {
            "rel_error": float(fid.rel_error.mean()),
            "mass": float(fid.mass.mean()),
            "read_fraction": fid.read_fraction,
            "rel_error_per_layer": fid.rel_error.tolist(),
            "mass_per_layer": fid.mass.tolist(),
        }
    return results


def perplexity_task(
    model, ids, runs: list[Run], settings: EvalSettings, bar, save_partial=None
) -> dict:
    """Teacher-forced perplexity and KL; ``save_partial`` receives the metrics over the tokens
    decoded so far every 256 steps (a stopped run keeps them)."""
    steps = ids.shape[1] - 1 - settings.context
    checkpoint = None if save_partial is None else lambda r: save_partial(_perplexity_metrics(r))
    with bar(total=steps, desc=f"teacher-forced ({len(runs) + 1} runs in lockstep)") as progress:
        results = teacher_forced(
            model, ids, settings.context, runs, progress, checkpoint=checkpoint
        )
    return _perplexity_metrics(results)


def _perplexity_metrics(results) -> dict:
    out = {}
    for label, r in results.items():
        half = r.kl.shape[1] // 2
        out[label] = {
            "decoded_tokens": r.kl.shape[1],
            "perplexity": math.exp(float(r.nll.mean())),
            "kl": float(r.kl.mean()),
            "kl_first_half": float(r.kl[:, :half].mean()),
            "kl_second_half": float(r.kl[:, half:].mean()),
            "read_fraction": sum(r.read_fraction) / len(r.read_fraction),
            "kl_by_position": _buckets(r.kl),
            "nll_by_position": _buckets(r.nll),
        }
    return out


def retrieval_task(model, tokenizer, runs, settings: EvalSettings, samples_path, bar) -> dict:
    from ..data import encode_prompt, make_retrieval, retrieval_score

    tally = _AnswerTally()
    device = next(model.parameters()).device
    for task in settings.retrieval_tasks:
        samples = make_retrieval(
            task, tokenizer, settings.context, settings.retrieval_samples, seed=settings.seed
        )
        for i, sample in enumerate(bar(samples, desc=f"retrieval {task}")):
            ids = torch.tensor([encode_prompt(tokenizer, sample.prompt)], device=device)
            outputs = generate(
                model, ids, [Run("dense", None), *runs], settings.retrieval_new_tokens
            )
            dense_tokens = outputs["dense"][0]
            for label, (tokens, fraction) in outputs.items():
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                score = retrieval_score(text, sample.answers)
                agree = token_agreement(tokens, dense_tokens)
                tally.add(label, score, agree, fraction)
                _append(samples_path, {
                    "task": task, "sample": i, "run": label, "depth": sample.depth,
                    "answers": sample.answers, "output": text, "score": score,
                    "agreement": agree, "read_fraction": fraction,
                })  # fmt: skip
    return tally.summary()


def gsm_task(model, tokenizer, head_dim: int, settings: EvalSettings, samples_path, bar) -> dict:
    """Chain-of-thought answers; each problem's runs are sized for its own prompt plus the
    generated tokens (a GSM prompt is far shorter than ``settings.context``), and a run the
    sink and window alone exceed at that length is left out for that problem."""
    from ..data import gsm_tasks, reasoning_score

    tally = _AnswerTally()
    device = next(model.parameters()).device
    for i, sample in enumerate(
        bar(gsm_tasks(settings.gsm_samples, seed=settings.seed), desc="gsm")
    ):
        ids = tokenizer.apply_chat_template(
            sample.prompt_messages, add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )["input_ids"].to(device)  # fmt: skip
        runs, _ = runs_for(settings, ids.shape[1] + settings.gsm_new_tokens, head_dim)
        outputs = generate(model, ids, [Run("dense", None), *runs], settings.gsm_new_tokens)
        dense_tokens = outputs["dense"][0]
        for label, (tokens, fraction) in outputs.items():
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            score = reasoning_score(text, sample)
            agree = token_agreement(tokens, dense_tokens)
            tally.add(label, score, agree, fraction)
            _append(samples_path, {
                "task": "gsm", "sample": i, "run": label, "answer": sample.answer,
                "output": text, "score": score, "agreement": agree, "read_fraction": fraction,
                "prompt_tokens": ids.shape[1],
            })  # fmt: skip
    return tally.summary()


def token_agreement(tokens: list[int], reference: list[int]) -> float:
    """Fraction of the reference's tokens generated identically before the first difference
    (1.0: the same greedy text)."""
    same = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        same += 1
    return same / max(1, len(reference))


# ----------------------------------------------------------------------------- output
def environment(device: torch.device) -> dict:
    """Versions, device, command line and time of a run, for its JSON."""
    from ..generate import versions

    return {
        **versions(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": " ".join(sys.argv),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def format_table(summary: dict) -> str:
    """One row per run: the headline metric of every task."""
    columns = {
        "fidelity": ("rel_error", "mass"),
        "perplexity": ("perplexity", "kl"),
        "retrieval": ("accuracy", "agreement"),
        "gsm": ("accuracy", "agreement"),
    }
    tasks = [t for t in columns if t in summary["tasks"]]
    labels: list[str] = []
    for t in tasks:
        labels += [label for label in summary["tasks"][t] if label not in labels]
    header = ["run", "read"] + [f"{t[:5]}.{m}" for t in tasks for m in columns[t]]
    rows = [header]
    for label in labels:
        read = next(
            (summary["tasks"][t][label].get("read_fraction") for t in tasks
             if label in summary["tasks"][t] and "read_fraction" in summary["tasks"][t][label]),
            None,
        )  # fmt: skip
        row = [label, "-" if read is None else f"{read:.3f}"]
        for t in tasks:
            entry = summary["tasks"][t].get(label)
            row += ["-" if entry is None else f"{entry[m]:.4g}" for m in columns[t]]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def plot(summary: dict, out_dir: Path) -> list[Path]:
    """Metric vs read fraction (log axis, one line per method, dense dashed) per task, and
    KL / NLL vs position at every fraction; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    metrics = [
        ("fidelity", "rel_error"),
        ("fidelity", "mass"),
        ("perplexity", "kl"),
        ("perplexity", "perplexity"),
        ("retrieval", "accuracy"),
        ("gsm", "accuracy"),
    ]
    tasks = summary["tasks"]
    present = [(t, m) for t, m in metrics if t in tasks]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.6), squeeze=False)
        for ax, (task, metric) in zip(axes[0], present, strict=True):
            for method in summary["settings"]["methods"]:
                points = sorted(
                    (v["read_fraction"] if "read_fraction" in v else _fraction(label), v[metric])
                    for label, v in tasks[task].items()
                    if label.split("@")[0] == method
                )
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=method)
            if "dense" in tasks[task]:
                ax.axhline(tasks[task]["dense"][metric], color="k", ls="--", label="dense")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("fraction of dense KV bytes read")
            ax.set_title(f"{task}: {metric}")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "metrics_vs_read_fraction.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if "perplexity" in tasks:
        fractions = summary["settings"]["fractions"]
        focus = min(fractions, key=lambda f: abs(math.log2(f * 16)))  # nearest to 1/16
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for label, v in tasks["perplexity"].items():
            if label == "dense" or label.endswith(f"@1/{round(1 / focus)}"):
                axes[0].plot(v["kl_by_position"], label=label)
                axes[1].plot(v["nll_by_position"], label=label)
        axes[0].set_title("KL(dense || method) vs position bucket")
        axes[1].set_title("NLL vs position bucket")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "kl_nll_vs_position.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


# ----------------------------------------------------------------------------- helpers
def _buckets(x: torch.Tensor, count: int = 16) -> list[float]:
    """Means of ``x [W, T]`` over ``count`` equal spans of positions."""
    spans = torch.tensor_split(x, min(count, x.shape[1]), dim=1)
    return [float(s.mean()) for s in spans]


def _fraction(label: str) -> float:
    return 1 / float(label.split("@1/")[1])


def _tensor(windows: list[list[int]], length: int, device) -> torch.Tensor:
    if any(len(w) < length for w in windows):
        raise ValueError(f"windows: expected at least {length} tokens each")
    return torch.tensor([w[:length] for w in windows], device=device)


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


class _AnswerTally:
    """Per run, each sample's answer score, token agreement with dense and read fraction; the
    tasks that generate answers (retrieval, GSM) report their means."""

    def __init__(self) -> None:
        self.rows_by_run: dict[str, list[tuple[float, float, float]]] = {}

    def add(self, label: str, score: float, agreement: float, read_fraction: float) -> None:
        self.rows_by_run.setdefault(label, []).append((score, agreement, read_fraction))

    def summary(self) -> dict:
        summary = {}
        for label, rows in self.rows_by_run.items():
            scores, agreements, fractions = zip(*rows, strict=True)
            summary[label] = {
                "accuracy": _mean(list(scores)),
                "agreement": _mean(list(agreements)),
                "read_fraction": _mean(list(fractions)),
                "samples": len(rows),
            }
        return summary


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _progress(enabled: bool):
    """``bar(iterable, desc=)`` / ``bar(total=, desc=)``: tqdm on stderr, or silent."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False

    def bar(iterable=None, *, total=None, desc=""):
        if enabled:
            return tqdm(iterable, total=total, desc=desc, leave=False)
        return _Silent(iterable)

    return bar


class _Silent:
    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``multipole eval``: parse options, load the model, run, print the table."""
    import argparse

    defaults = EvalSettings()
    parser = argparse.ArgumentParser(prog="multipole eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="registry name, HF dir or .gguf")
    parser.add_argument("--tasks", default=",".join(defaults.tasks), help=f"of {TASKS}")
    parser.add_argument("--methods", default=",".join(defaults.methods))
    parser.add_argument(
        "--fractions", default="1/64,1/32,1/16,1/8", help="fractions of dense KV bytes read"
    )
    parser.add_argument("--context", type=int, default=defaults.context)
    parser.add_argument("--decode-tokens", type=int, default=defaults.decode_tokens)
    parser.add_argument("--windows", type=int, default=defaults.windows)
    parser.add_argument("--fidelity-steps", type=int, default=defaults.fidelity_steps)
    parser.add_argument("--retrieval-tasks", default=",".join(defaults.retrieval_tasks))
    parser.add_argument("--retrieval-samples", type=int, default=defaults.retrieval_samples)
    parser.add_argument("--gsm-samples", type=int, default=defaults.gsm_samples)
    parser.add_argument("--gsm-new-tokens", type=int, default=defaults.gsm_new_tokens)
    parser.add_argument("--metadata-share", type=float, default=defaults.metadata_share)
    parser.add_argument("--position-free-keys", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16")
    parser.add_argument("--out", default="eval_results", help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    def names(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
        items = tuple(x for x in text.split(",") if x)
        bad = [x for x in items if x not in allowed]
        if bad:
            parser.error(f"{option}: unknown {bad}; expected some of {', '.join(allowed)}")
        return items

    def fraction(text: str) -> float:
        num, _, den = text.partition("/")
        return float(num) / float(den) if den else float(num)

    settings = EvalSettings(
        tasks=names(args.tasks, TASKS, "--tasks"),
        methods=names(args.methods, METHODS, "--methods"),
        fractions=tuple(fraction(f) for f in args.fractions.split(",")),
        context=args.context,
        decode_tokens=args.decode_tokens,
        windows=args.windows,
        fidelity_steps=args.fidelity_steps,
        retrieval_tasks=names(args.retrieval_tasks, RETRIEVAL_TASKS, "--retrieval-tasks"),
        retrieval_samples=args.retrieval_samples,
        gsm_samples=args.gsm_samples,
        gsm_new_tokens=args.gsm_new_tokens,
        metadata_share=args.metadata_share,
        position_free_keys=args.position_free_keys,
        seed=args.seed,
    )
    from ..models import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    summary = run_eval(
        model, tokenizer, settings, Path(args.out), progress=not args.quiet, model_name=args.model
    )
    print(format_table(summary))
    for note in summary["skipped"]:
        print("not reachable:", note)
    print(f"wrote {args.out}/summary.json, samples.jsonl and plots")
    return 0
