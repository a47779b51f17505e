"""The ``multipole`` command line: ``info``, ``demo``, ``generate`` and ``bench``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import platform
import sys

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
    from .config import MultipoleConfig
    from .demo import DemoSettings, format_table, run_demo, save_report

    config = MultipoleConfig(interval=args.interval, block_size=args.block_size)
    settings = DemoSettings(
        context=args.context,
        steps=args.steps,
        num_kv_heads=args.kv_heads,
        num_q_heads=args.q_heads,
        head_dim=args.head_dim,
        read_fraction=args.read_fraction,
        seed=args.seed,
        config=config,
        **({"device": args.device} if args.device else {}),
    )
    shown = {k: v for k, v in dataclasses.asdict(settings).items() if k != "config"}
    print("multipole demo:", ", ".join(f"{k}={v}" for k, v in shown.items()))
    report = run_demo(settings, progress=not args.quiet)
    print()
    print(
        f"Every method at ~{args.read_fraction:.2%} of the dense KV bytes (centroid and page "
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
        "demo", help="every method on a synthetic long context at equal bytes read"
    )
    demo.add_argument("--context", type=int, default=32768, help="prefill tokens")
    demo.add_argument("--steps", type=int, default=256, help="decode steps (each appends a token)")
    demo.add_argument("--kv-heads", type=int, default=8)
    demo.add_argument("--q-heads", type=int, default=32)
    demo.add_argument("--head-dim", type=int, default=128)
    demo.add_argument(
        "--read-fraction",
        type=float,
        default=0.1,
        help="fraction of dense KV bytes every method may read",
    )
    demo.add_argument("--interval", type=int, default=128)
    demo.add_argument("--block-size", type=int, default=8192)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    demo.add_argument("--json", default=None, help="write the full report to this file")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

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
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # the command's own arguments, for reports
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
