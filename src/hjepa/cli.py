"""The ``hjepa`` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from hjepa import __version__
from hjepa.config import ConfigError, dump_yaml, load_config, preset_names


def _train(args: argparse.Namespace) -> int:
    from hjepa.train.trainer import TrainingInterrupted, train

    cfg = load_config(args.config, args.overrides)
    if args.print_config:  # before train(): no run folder, no data
        print(dump_yaml(cfg), end="")
        return 0
    try:
        result = train(cfg, allow_config_change=args.allow_config_change)
    except TrainingInterrupted as stop:
        if stop.is_main:  # one line per job, not per torchrun rank
            again = shlex.join(["hjepa", *args.argv])
            print(f"hjepa train: {stop.describe()}; resume with: {again}", file=sys.stderr)
        return stop.exit_code
    if result.is_main:  # one line per job, not per torchrun rank
        print(f"trained {result.step}/{result.total_steps} steps; run dir: {cfg.run.dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hjepa.eval.runner import evaluate_run, format_table
    from hjepa.experiments.report import write_eval_report

    overrides = list(args.overrides)
    if args.transfer:
        overrides.append(f"eval.transfer={json.dumps(args.transfer)}")
    overrides += ["eval.low_shot=false"] if args.no_low_shot else []
    overrides += ["eval.robustness=false"] if args.no_robustness else []
    results = evaluate_run(
        args.run_dir,
        baselines=False if args.no_baselines else None,
        overrides=overrides,
        checkpoint=args.checkpoint,
    )
    print(format_table(results))
    report = write_eval_report(args.run_dir, results)
    print(f"wrote {args.run_dir}/eval.json and {report}")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from hjepa.experiments import ablate

    # `--seeds 0 1 key=value` would swallow the overrides: hand them back.
    seeds = [s for s in args.seeds if "=" not in s]
    overrides = [*args.overrides, *(s for s in args.seeds if "=" in s)]
    try:
        seeds = [int(s) for s in seeds]
    except ValueError as e:
        raise ConfigError(f"--seeds takes integers, got {seeds}") from e
    variants = ablate.grid_variants(args.grid) if args.grid else []
    if args.variants:
        variants += ablate.read_variants(args.variants)
    if args.review or not variants:
        variants = [*ablate.REVIEW_STUDY, *variants]
    if args.dry_run:
        runs = ablate.plan_runs(variants, seeds, args.out, overrides)
        for run in runs:
            load_config(args.config, run.overrides)  # fail now, not after hours of training
        print(ablate.describe(runs, args.config, overrides), end="")
        print(f"{len(runs)} runs under {args.out}/runs (dry run: nothing trained)")
        return 0
    ablate.run_ablation(variants, seeds, args.out, preset=args.config, extra=overrides)
    return 0


def _viz(args: argparse.Namespace) -> int:
    from hjepa.viz.runner import PLOTS, visualize_run

    paths = visualize_run(
        args.run_dir,
        num_images=args.images,
        seed=args.seed,
        query=args.query,
        only=args.only or PLOTS,
        checkpoint=args.checkpoint,
    )
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from hjepa.data.check import describe_dataset

    if args.name == "prepare":
        return _prepare_shards(args)
    if args.paths:
        raise ValueError(f"hjepa data {args.name} takes no paths (only hjepa data prepare does)")
    report = describe_dataset(
        args.name, args.root, image_size=args.image_size, val_fraction=args.val_fraction
    )
    print(json.dumps(report, indent=2))
    return 0


def _prepare_shards(args: argparse.Namespace) -> int:
    from hjepa.data.folder_index import DEFAULT_VAL_FRACTION
    from hjepa.data.shards import prepare

    if len(args.paths) != 2:
        raise ValueError("usage: hjepa data prepare SRC DST (an image folder and a new folder)")
    fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    options = {"class_subset": args.class_subset, "shard_bytes": args.shard_mb << 20}
    try:
        manifest = prepare(*args.paths, val_fraction=fraction, **options)
    except ImportError as missing:  # the one-line error of main(), with the pip command
        raise ValueError(str(missing)) from missing
    print(json.dumps({k: manifest[k] for k in ("format", "images", "class_subset")}, indent=2))
    dst = args.paths[1]
    print(f"wrote WebDataset shards to {dst}; train on them with data.root={dst}")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "timm":
        from hjepa.export_timm import export_timm

        weights, card, line = export_timm(args.run_dir, args.out, checkpoint=args.checkpoint)
        print(f"wrote {weights} and {card}; load it in timm with:\n  {line}")
        return 0
    from hjepa.export import export_run

    weights, card = export_run(args.run_dir, args.out, checkpoint=args.checkpoint)
    print(f"wrote {weights} and {card}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from hjepa.extract import extract_features

    done = extract_features(
        args.run_dir,
        args.split,
        args.out,
        level=args.level,
        checkpoint=args.checkpoint,
        overrides=args.overrides,
        progress=not args.no_progress,
    )
    print(
        f"wrote {done['out']}: features [{done['images']}, {done['dim']}] ({done['level']}) "
        f"and labels of the {done['split']} split, checkpoint step {done['step']}"
    )
    if done["skipped"]:  # no row for them; the .npz lists them as skipped_paths
        shown = ", ".join(done["skipped"][:5]) + (", ..." if len(done["skipped"]) > 5 else "")
        print(f"skipped {len(done['skipped'])} unreadable image(s): {shown}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from hjepa import config_table

    if args.markdown:
        print(config_table.markdown(), end="")
    elif args.list:
        print(config_table.text(), end="")
    else:  # the resolved config of --config plus overrides, as `train --print-config` shows it
        print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from hjepa.step_speed import benchmark_step

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(benchmark_step(cfg, steps=args.steps, warmup=args.warmup), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hjepa", description="Hierarchical JEPA self-supervised learning"
    )
    parser.add_argument("--version", action="version", version=f"hjepa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train,
        _add_config,
        _add_eval,
        _add_ablate,
        _add_viz,
        _add_data,
        _add_export,
        _add_extract,
        _add_bench,
    ):
        add(sub)
    return parser


CHECKPOINT_HELP = "checkpoint file to read (default RUN_DIR/checkpoints/last.pt)"


def _config_help() -> str:
    return f"preset ({', '.join(preset_names())}) or YAML path"


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="pretrain (resumes when run.dir has a checkpoint)")
    p.add_argument("--config", default="quickstart", help=_config_help())
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume run.dir although the config changes its recipe (recorded in "
        "config_history.yaml)",
    )
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=100")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit (no run folder, no data read)",
    )
    p.set_defaults(func=_train)


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="the config keys (--list) or a resolved config as YAML")
    p.add_argument("--list", action="store_true", help="every key: type, default, bounds, help")
    p.add_argument("--markdown", action="store_true", help="the key table as docs/config.md")
    p.add_argument("--config", default="quickstart", help=_config_help())
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=100")
    p.set_defaults(func=_config)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="kNN + linear probes of a run, beside pixels and random init")
    p.add_argument("run_dir")
    p.add_argument("--no-baselines", action="store_true", help="skip pixels and random init")
    p.add_argument("--no-low-shot", action="store_true", help="skip the 1%%/10%% label probes")
    p.add_argument("--no-robustness", action="store_true", help="skip the corrupted test set")
    p.add_argument(
        "--transfer",
        action="append",
        default=[],
        metavar="SPEC",
        help="also probe on 'digits' or 'image_folder:PATH' (repeatable)",
    )
    p.add_argument("--checkpoint", default=None, metavar="PATH", help=CHECKPOINT_HELP)
    p.add_argument("overrides", nargs="*", help="eval.key=value, e.g. eval.robustness_limit=500")
    p.set_defaults(func=_eval)


def _add_ablate(sub) -> None:
    p = sub.add_parser(
        "ablate", help="train + evaluate variants over seeds (resumable); ablation.md/png, report"
    )
    p.add_argument("--config", default="quickstart", help=_config_help())
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a grid axis (several: cartesian product); '|' separates list values",
    )
    p.add_argument("--variants", metavar="FILE", help="'name|key=value ...' lines")
    p.add_argument("--review", action="store_true", help="add the review study to a grid")
    p.add_argument("--seeds", nargs="+", default=["0", "1"], help="seeds per variant")
    p.add_argument("--out", default="runs/ablation", help="study folder (runs/ inside)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run")
    p.set_defaults(func=_ablate)


def _add_viz(sub) -> None:
    p = sub.add_parser("viz", help="PNGs of masks, attention, feature PCA and training curves")
    p.add_argument("run_dir")
    p.add_argument("--images", type=int, default=4, help="test images shown")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask samples")
    p.add_argument("--query", type=int, default=None, help="query token (default: centre)")
    p.add_argument("--only", nargs="+", choices=("masks", "attention", "pca", "curves"))
    p.add_argument("--checkpoint", default=None, metavar="PATH", help=CHECKPOINT_HELP)
    p.set_defaults(func=_viz)


def _add_data(sub) -> None:
    p = sub.add_parser(
        "data",
        help="check that a dataset can be read and count it; 'prepare SRC DST' writes shards",
    )
    p.add_argument("name", help="a dataset name, or 'prepare' to shard an image folder")
    p.add_argument("paths", nargs="*", help="prepare: SRC (image folder) and DST (new folder)")
    p.add_argument("--class-subset", default=None, help="prepare: data.class_subset of SRC")
    p.add_argument("--shard-mb", type=int, default=1024, help="prepare: megabytes per shard")
    p.add_argument("--root", default=None)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="image folder without val/: share of each class held out (data.val_fraction)",
    )
    p.set_defaults(func=_data)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run's target encoder as safetensors + JSON card")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="FILE.safetensors (default RUN_DIR/encoder...)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help=CHECKPOINT_HELP)
    p.add_argument(
        "--format",
        choices=("hjepa", "timm"),
        default="hjepa",
        help="hjepa: for hjepa.load_encoder; timm: a state dict timm.create_model loads",
    )
    p.set_defaults(func=_export)


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract", help="write the features hjepa eval probes (+ labels) of a split as .npz"
    )
    p.add_argument("run_dir")
    p.add_argument("--split", required=True, choices=("train", "test"))
    p.add_argument("--out", required=True, metavar="FILE.npz")
    p.add_argument(
        "--level",
        default="concat",
        help="level0, level1, ... or concat (default; level0 with one level)",
    )
    p.add_argument("--checkpoint", default=None, metavar="PATH", help=CHECKPOINT_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides",
        nargs="*",
        help="data.key=value for another dataset; eval.batch_size, train.device, train.num_workers",
    )
    p.set_defaults(func=_extract)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="training throughput vs the encoder's forward+backward")
    p.add_argument("--config", default="quickstart")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_bench)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv  # the command line, for the resume hint of an interrupted run
    # argparse takes positionals in one run, so `eval RUN --flag key=value` leaves key=value
    # over: hand such items to the command's overrides; anything else is still an error.
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"hjepa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # an unusable checkpoint (2) or a NaN/inf that stopped training (1)
        from hjepa.checkpoint import CheckpointError
        from hjepa.train.trainer import NonFiniteLossError

        if not isinstance(e, CheckpointError | NonFiniteLossError):
            raise
        print(f"hjepa {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, CheckpointError) else 1
    except OSError as e:  # disk full, read-only or missing run directory, ...
        print(f"hjepa {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (setup, eval, ...)
        print(f"hjepa {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
