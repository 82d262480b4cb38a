"""The ``hjepa`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from hjepa.config import ConfigError, load_config, preset_names


def _train(args: argparse.Namespace) -> int:
    from hjepa.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    trainer = train(cfg)
    print(f"trained {trainer.step}/{trainer.total_steps} steps; run dir: {cfg.run.dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hjepa.eval.runner import evaluate_run, format_table

    results = evaluate_run(args.run_dir, baselines=False if args.no_baselines else None)
    print(format_table(results))
    print(f"wrote {args.run_dir}/eval.json")
    return 0


def _data(args: argparse.Namespace) -> int:
    from hjepa.data.datasets import build_dataset

    info = {}
    for split in ("train", "test"):
        ds = build_dataset(args.name, args.root, split, image_size=args.image_size)
        info[split] = {"images": len(ds), "num_classes": getattr(ds, "num_classes", None)}
    print(json.dumps({"dataset": args.name, **info}, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from hjepa.bench import benchmark_step

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(benchmark_step(cfg, steps=args.steps, warmup=args.warmup), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hjepa", description="Hierarchical JEPA self-supervised learning"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    presets = ", ".join(preset_names())

    p = sub.add_parser("train", help="pretrain (resumes when run.dir has a checkpoint)")
    p.add_argument("--config", default="quickstart", help=f"preset ({presets}) or YAML path")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=100")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="kNN + linear probes of a run, beside pixels and random init")
    p.add_argument("run_dir")
    p.add_argument("--no-baselines", action="store_true", help="skip pixels and random init")
    p.set_defaults(func=_eval)

    p = sub.add_parser("data", help="check that a dataset can be read and count it")
    p.add_argument("name")
    p.add_argument("--root", default=None)
    p.add_argument("--image-size", type=int, default=28)
    p.set_defaults(func=_data)

    p = sub.add_parser("bench", help="training throughput vs the encoder's forward+backward")
    p.add_argument("--config", default="quickstart")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"hjepa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
