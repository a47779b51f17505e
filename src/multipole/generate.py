"""``multipole generate``: one prompt through a model, streamed, with Multipole Attention.

The prompt runs exact attention (prefill); every decode step then runs the chosen method
through :class:`~multipole.MultipoleCache`, or stock SDPA with ``--dense``. Text streams to
stdout as it is generated, progress goes to stderr, and the summary gives the prefill time,
the decode speed and the fraction of the KV cache bytes the last step read.

    multipole generate --model smollm2-135m --prompt-file doc.txt --budget 0.05 --json out.json

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is loaded with tensor parallelism
(``DistributedConfig(tp_size=WORLD_SIZE)``): each rank holds its share of the heads and only
rank 0 prints.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .config import MultipoleConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

METHOD_NAMES = ("multipole", "centroid_only", "quest", "oracle_topk", "window", "dense")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Sampling:
    """Decoding rule: greedy unless ``sample`` (then temperature and nucleus sampling)."""

    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.sample:
            return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def parse_budget(text: str) -> int | float:
    """``--budget``: an int (tokens per KV head) or a float in (0, 1) (a fraction)."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = -1
        if not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(
                f"expected an int (tokens) or a float in (0, 1) (fraction), got {text!r}"
            ) from None
        return value
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0 (tokens), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``multipole generate``."""
    parser.add_argument(
        "--model",
        required=True,
        help="registered name (multipole.models), local Hugging Face directory or .gguf file",
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="read the prompt from this file ('-': stdin)")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="tokens to generate (default: %(default)s)"
    )
    parser.add_argument(
        "--budget",
        type=parse_budget,
        default=MultipoleConfig.token_budget,
        help="token_budget: tokens per KV head (int) or fraction of the clustered region "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--centroid-ratio",
        type=float,
        default=MultipoleConfig.centroid_ratio,
        help="clusters per clustered token (default: %(default)s)",
    )
    parser.add_argument(
        "--interval",
        type=int,
        default=MultipoleConfig.interval,
        help="online update period (default: %(default)s)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=MultipoleConfig.block_size,
        help="tokens per k-means block (default: %(default)s)",
    )
    parser.add_argument(
        "--method",
        choices=METHOD_NAMES,
        default=None,
        help="decode method of every layer (default: multipole)",
    )
    parser.add_argument(
        "--dense", action="store_true", help="stock SDPA attention, no MultipoleCache"
    )
    parser.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    parser.add_argument("--temperature", type=float, default=None, help="with --sample (1.0)")
    parser.add_argument("--top-p", type=float, default=None, help="with --sample (1.0)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the sampling (default: %(default)s)"
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="default: bfloat16 on CUDA, else float32",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--json", default=None, help="write config, timings and text here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_args(args: argparse.Namespace) -> MultipoleConfig | None:
    """The cache config the arguments ask for (None with ``--dense``).

    Raises:
        ValueError: contradictory or out-of-range options (the message names the option).
    """
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected an int >= 1, got {args.max_new_tokens}")
    if not args.sample and (args.temperature is not None or args.top_p is not None):
        raise ValueError("--temperature and --top-p apply to sampling: add --sample")
    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"--temperature: expected a float > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p: expected a float in (0, 1], got {args.top_p}")
    if args.dense:
        if args.method is not None:
            raise ValueError("--dense runs stock attention without a cache method: drop --method")
        return None
    try:
        return MultipoleConfig(
            token_budget=args.budget,
            centroid_ratio=args.centroid_ratio,
            interval=args.interval,
            block_size=args.block_size,
        )
    except (TypeError, ValueError) as e:
        message = str(e)
        for field in ("centroid_ratio", "interval", "block_size"):
            message = message.replace(f"MultipoleConfig.{field}", "--" + field.replace("_", "-"))
        raise ValueError(message) from None


def load(
    name_or_path: str,
    *,
    dtype: torch.dtype,
    device: str,
    attn_implementation: str,
    tp_size: int = 1,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode) and tokenizer: :func:`multipole.models.load_model`, or with
    ``tp_size > 1`` the same files loaded with transformers tensor parallelism."""
    from . import models

    if tp_size == 1:
        return models.load_model(
            name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, DistributedConfig

    path = Path(name_or_path).expanduser()
    if str(name_or_path) in models.MODELS or path.suffix == ".gguf":
        path = models.convert(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype,
        attn_implementation=attn_implementation,
        distributed_config=DistributedConfig(tp_size=tp_size),
    )
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, *, chat: bool
) -> tuple[torch.Tensor, bool]:
    """``input_ids [1, T]`` of the prompt, through the chat template when ``chat`` and the
    tokenizer has one; and whether the template was applied."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )["input_ids"]
        return ids, True
    return tokenizer(prompt, return_tensors="pt")["input_ids"], False


def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    *,
    cache: Any = None,
    max_new_tokens: int = 256,
    sampling: Sampling | None = None,
    stream: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate from ``input_ids [1, T]``; returns the text, token counts and timings.

    Timings come from the arrival of each token on the host (the streamer syncs):
    ``prefill_s`` until the first new token (the prompt pass), ``first_step_s`` the first
    decode step (with a MultipoleCache it also clusters the prompt's keys), and
    ``decode_tokens_per_s`` over the remaining steps.
    """
    from transformers import TextStreamer

    from .hf import cache_keyword

    sampling = sampling or Sampling()
    torch.manual_seed(sampling.seed)
    times: list[float] = []
    bar = _progress_bar(max_new_tokens, progress)

    class Streamer(TextStreamer):
        def put(self, value: torch.Tensor) -> None:
            if not self.next_tokens_are_prompt:  # a new token, not the prompt
                times.append(time.perf_counter())
                bar.set_description("decode")
                bar.update(1)
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if stream:
                print(text, end="\n" if stream_end else "", flush=True)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = input_ids.to(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            **{cache_keyword(model): cache},
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            streamer=Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            **sampling.generate_kwargs(),
        )
    end = time.perf_counter()
    bar.close()
    new = out[0, input_ids.shape[1] :]
    rest = len(times) - 2  # decode steps after the first
    return dict(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=int(input_ids.shape[1]),
        new_tokens=int(new.numel()),
        prefill_s=times[0] - start if times else end - start,
        first_step_s=times[1] - times[0] if len(times) > 1 else None,
        decode_s=times[-1] - times[1] if rest > 0 else None,
        decode_tokens_per_s=rest / (times[-1] - times[1]) if rest > 0 else None,
        total_s=end - start,
    )


def main(args: argparse.Namespace, config: MultipoleConfig | None) -> int:
    """Run ``multipole generate`` with parsed ``args`` and the config from :func:`check_args`."""
    import multipole.hf  # noqa: F401  (registers attn_implementation="multipole")

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1 and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dtype = DTYPES[args.dtype] if args.dtype else _default_dtype(device)
    method = "dense (stock SDPA)" if config is None else (args.method or "multipole")
    prompt = _read_prompt(args)
    say = print if rank == 0 else _silent

    attn = "sdpa" if config is None else "multipole"
    model, tokenizer = load(
        args.model, dtype=dtype, device=device, attn_implementation=attn, tp_size=world
    )
    input_ids, chat = encode_prompt(tokenizer, prompt, chat=not args.raw)
    say(
        f"[multipole] {args.model}: {input_ids.shape[1]} prompt tokens"
        f"{' (chat template)' if chat else ''}, {method}, {dtype}, {model.device}"
        + (f", tensor parallel x{world}" if world > 1 else ""),
        file=sys.stderr,
        flush=True,
    )
    cache = None
    if config is not None:
        from .hf import MultipoleCache

        cache = MultipoleCache(config, method=args.method or "multipole")
    sampling = Sampling(
        sample=args.sample,
        temperature=args.temperature if args.temperature is not None else 1.0,
        top_p=args.top_p if args.top_p is not None else 1.0,
        seed=args.seed,
    )
    result = generate_text(
        model,
        tokenizer,
        input_ids,
        cache=cache,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        stream=rank == 0,
        progress=rank == 0 and not args.no_progress,
    )
    result["read_fraction"] = 1.0 if config is None else cache.read_fraction()
    say(_summary(result), file=sys.stderr, flush=True)
    if args.json and rank == 0:
        report = dict(
            command=shlex.join(["multipole", "generate", *args.argv]),
            utc=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            model=args.model,
            method="dense" if config is None else args.method or "multipole",
            config=None if config is None else config.to_dict(),
            generation=dict(
                max_new_tokens=args.max_new_tokens, chat_template=chat, **vars(sampling)
            ),
            device=_device_name(model.device),
            dtype=str(dtype).removeprefix("torch."),
            tensor_parallel=world,
            versions=versions(),
            **result,
        )
        _write_json(args.json, report)
        say(f"[multipole] wrote {args.json}", file=sys.stderr)
    return 0


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA only), e.g. around a timed region."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    return Path(args.prompt_file).read_text()


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    # off when stderr is not a terminal (disable=None), and always with --no-progress
    return tqdm(
        total=total,
        desc="prefill",
        unit="tok",
        file=sys.stderr,
        disable=None if enabled else True,
        leave=False,
    )


def _summary(r: dict[str, Any]) -> str:
    speed = r["decode_tokens_per_s"]
    parts = [
        f"{r['new_tokens']} new tokens",
        f"prefill {r['prefill_s']:.2f} s ({r['prompt_tokens']} tokens)",
    ]
    if r["first_step_s"] is not None:
        parts.append(f"first decode step {r['first_step_s'] * 1e3:.0f} ms")
    if speed is not None:
        parts.append(f"decode {speed:.1f} tokens/s")
    if r["read_fraction"] is not None:
        parts.append(f"KV bytes read {r['read_fraction']:.1%}")
    return "[multipole] " + ", ".join(parts)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or device.type


def versions() -> dict[str, str]:
    """Versions of Python and the packages a report depends on."""
    import transformers

    versions = dict(
        multipole=__version__,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


def _write_json(path: str, report: dict[str, Any]) -> None:
    import json

    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def _silent(*_: Any, **__: Any) -> None:
    pass
