"""`daae train | eval | sample | curves | summary | tune`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError

log = logging.getLogger("daae")
USER_ERRORS = (ConfigError, CheckpointError, DataError)


def _refuse_moves(resume: str, overrides: list[str]) -> None:
    """A resume goes on in its own folder: an override of run.dir or run.name
    that points elsewhere would only be written into config.yaml."""
    from .runs import FOLDER_KEYS
    from .schema import apply_overrides

    given = apply_overrides({}, overrides).get("run") or {}
    for key in FOLDER_KEYS:
        name = key.split(".")[1]
        if name in given:
            raise ConfigError(
                f"{key}: --resume {resume} goes on in that folder, wherever {key} points; to "
                f"move the run, copy its folder (cp -r {resume} NEW) and resume the copy")


def _train(args) -> int:
    from .config import load_config
    from .runs import load_run_config
    from .interrupt import TrainingInterrupted
    from .train import NonFiniteLossError, train

    if args.resume and not args.config:
        config = load_run_config(args.resume, args.overrides)
    elif args.config:
        config = load_config(args.config, args.overrides)
    else:
        raise ConfigError("daae train needs --config FILE (or --resume RUN_DIR)")
    if args.resume:
        _refuse_moves(args.resume, args.overrides)
    try:
        result = train(config, resume=args.resume)
    except NonFiniteLossError as exc:  # its message says what to change and what was kept
        log.error("%s", exc)
        return 2
    except TrainingInterrupted as exc:
        log.warning("%s", exc)
        return 130  # the shell's code for a run stopped by Ctrl-C
    log.info("finished %s: %s", result["run_dir"], json.dumps(
        {k: v for k, v in result.get("test", result.get("validation", {})).items()}))
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate_run

    metrics = evaluate_run(args.checkpoint, split=args.split, overrides=args.overrides,
                           device=args.device, class_map=args.class_map)
    if args.json:
        sys.stdout.write(json.dumps(metrics, sort_keys=True) + "\n")
    else:
        for key, value in sorted(metrics.items()):
            sys.stdout.write(f"{key:28s} {value}\n")
    return 0


def _sample(args) -> int:
    from .sample import write_sample

    path = write_sample(args.checkpoint, kind=args.kind, n=args.n, seed=args.seed, out=args.out,
                        device=args.device, class_map=args.class_map)
    log.info("wrote %s", path)
    return 0


def _curves(args) -> int:
    from .curves import write_curves

    log.info("wrote %s", write_curves(args.logdir, args.out, args.tags))
    return 0


def _summary(args) -> int:
    from .summary import markdown, markdown_steps, summarize, summarize_steps

    label = args.label or ", ".join(args.runs)
    if args.at is None and args.between is None:
        summary = summarize(args.runs)
        text = markdown(summary, label)
    else:
        windows = args.at if args.at is not None else [tuple(args.between)]
        summary = summarize_steps(args.runs, windows)
        text = markdown_steps(summary, label)
    sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n" if args.json else text)
    return 0


def _class_map_options(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--class-whitened / --class-gaussianized (one at most): the post-hoc map of
    z within its predicted class (daae.whitening)."""
    maps = parser.add_mutually_exclusive_group()
    maps.add_argument("--class-whitened", dest="class_map", action="store_const", const="whitened",
                      help=help_text.format("whitened"))
    maps.add_argument("--class-gaussianized", dest="class_map", action="store_const",
                      const="gaussianized",
                      help=help_text.format("Gaussianized (whitened, then each class's shape "
                                            "mapped to N(0, I))"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daae", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model")
    train.add_argument("--config", help="YAML config (configs/mnist.yaml)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="metrics of a trained run (DESIGN.md section 4)")
    evaluate.add_argument("--checkpoint", required=True, metavar="RUN_DIR")
    evaluate.add_argument("--split", choices=("test", "validation"), default="test")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    _class_map_options(evaluate, "read z {} within its predicted class (post hoc; no adversary figure)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value",
                          help="overrides of the run's config, e.g. eval.probe_epochs=5")
    evaluate.set_defaults(handler=_eval)

    sample = commands.add_parser("sample", help="PNG grids of what a trained run generates")
    sample.add_argument("--checkpoint", required=True, metavar="RUN_DIR")
    sample.add_argument("--kind", required=True, choices=("style", "random", "interpolate"))
    sample.add_argument("--n", type=int, default=8, help="rows of the grid")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", required=True, metavar="FILE.png")
    _class_map_options(sample, "z {} within its predicted class, as daae eval does with the flag")
    sample.add_argument("--device", default=None)
    sample.set_defaults(handler=_sample)

    from .curves import DEFAULT_TAGS

    curves = commands.add_parser("curves", help="TensorBoard scalars of runs as a PNG of line plots")
    curves.add_argument("--logdir", required=True, help="a run folder, or a folder of runs or trials")
    curves.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS),
                        help=f"scalar tags, one panel each (default: {' '.join(DEFAULT_TAGS)})")
    curves.add_argument("--out", required=True, metavar="FILE.png")
    curves.set_defaults(handler=_curves)

    summary = commands.add_parser("summary", help="mean ± std of runs (seeds) as a table row: "
                                                  "finished runs' metrics.json, or validation at steps")
    summary.add_argument("runs", nargs="+", metavar="RUN_DIR",
                         help="run folders (holding metrics.json, unless --at or --between)")
    summary.add_argument("--label", default=None, help="the row's name (default: the folders)")
    summary.add_argument("--json", action="store_true",
                         help="print JSON instead (a list with --at or --between)")
    steps = summary.add_mutually_exclusive_group()
    steps.add_argument("--at", nargs="+", type=int, metavar="STEP",
                       help="validation figures from TensorBoard at these steps, one row each "
                            "(the runs need not be finished)")
    steps.add_argument("--between", nargs=2, type=int, metavar=("FIRST", "LAST"),
                       help="each run's mean of its validation evaluations at steps FIRST..LAST")
    summary.set_defaults(handler=_summary)

    commands.add_parser("tune", help="Ray Tune search (see `daae tune --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tune"]:
        # Ray is imported only here, so plain training never loads it.
        from tune.cli import main as tune_main

        return tune_main(argv[1:])
    args = build_parser().parse_args(argv)
    # Only the main process talks; the others would repeat every line. The rank
    # comes from the launcher's environment: creating Accelerate's state here,
    # before train() builds its Accelerator, would lose ACCELERATE_USE_CPU.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except USER_ERRORS as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        if args.command == "train":
            raise  # its first Ctrl-C is handled as a stop; a second one stops at once
        # Every file daae writes is written to a temporary file and renamed.
        log.warning("daae %s interrupted; no file was left half-written", args.command)
        return 130  # the shell's code for a command stopped by Ctrl-C
