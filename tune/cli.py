"""`daae tune` (also `python -m tune`): run, resume or check a search.

    daae tune --config configs/tune/smoke.yaml [key=value ...]
    daae tune --config configs/tune/weights.yaml --address auto num_samples=32
    daae tune --resume ray_results/smoke
    daae tune --check --config configs/tune/ablation.yaml

``key=value`` sets the search YAML's own keys (``num_samples=2``,
``storage_path=DIR``, ``scheduler.grace_period=500``); trainer keys go through
``overrides.KEY=VALUE``, search ranges through ``'space.KEY={choice: [...]}'``
(quoted: the shell would split it at its spaces).
"""
from __future__ import annotations

import argparse
import logging
import sys

from daae.checkpoint import CheckpointError
from daae.config import ConfigError
from daae.data import DataError

log = logging.getLogger("tune")
USER_ERRORS = (ConfigError, CheckpointError, DataError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daae tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", metavar="SEARCH.yaml", help="search YAML (configs/tune/*.yaml)")
    what.add_argument("--resume", metavar="EXPERIMENT", help="continue this interrupted search folder")
    parser.add_argument("--check", action="store_true",
                        help="validate the search YAML and print it resolved; start nothing")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to use ('auto', ray://...); default: $RAY_ADDRESS, "
                             "else Ray starts in this process")
    parser.add_argument("--no-resource-check", action="store_true",
                        help="skip the check that the cluster can place a trial "
                             "(for clusters that autoscale)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the search YAML's keys")
    return parser


def _write_tables(outcome) -> None:
    from .results import ARMS_MD, CONFIGS_MD, TRIALS_MD
    from .storage import read_text

    for name in (TRIALS_MD, ARMS_MD, CONFIGS_MD):
        if name in outcome.files:
            sys.stdout.write(f"\n{name}:\n{read_text(outcome.files[name])}")


def _draws(spec) -> str:
    """With ``seeds``, the configurations the search will train, as comments:
    drawn in the driver with the search's ``seed``, so a run draws the same."""
    if not spec.file.seeds:
        return ""
    if spec.file.seed is None:
        return "# seed: null: the draws are made afresh when the search starts\n"
    try:
        draws = spec.sampled_configs()
    except ImportError:  # --check needs no Ray; only Ray's generator knows its draws
        return ("# the draws are Ray Tune's: install it (pip install 'daae[tune]') to list them "
                "here; the search draws them when it starts\n")
    lines = [f"# c{index}: {values}" for index, values in enumerate(draws)]
    return f"# each trained on seeds {spec.file.seeds}:\n" + "\n".join(lines) + "\n"


def run(args) -> int:
    from .spec import load_search

    if args.resume:
        if args.overrides or args.check:
            raise ConfigError("--resume continues a search as it was saved; it takes no overrides "
                              "and no --check")
        from .runner import resume_search

        outcome = resume_search(args.resume, address=args.address)
    else:
        spec = load_search(args.config, args.overrides)
        if args.check:
            sys.stdout.write(spec.to_yaml() + _draws(spec))
            return 0
        from .runner import run_search

        outcome = run_search(spec, address=args.address,
                             check_resources=not args.no_resource_check)
    if not outcome.complete:
        return 1
    _write_tables(outcome)
    for name, path in outcome.files.items():
        log.info("wrote %s", path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return run(args)
    except USER_ERRORS as exc:
        log.error("%s", exc)
        return 2
