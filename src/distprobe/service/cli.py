"""``distprobe eval | watch | results | retry``: the probing service's commands.

    distprobe eval RUN/checkpoints/epoch=3-step=400.ckpt --config eval.yaml --cluster local --tasks-per-node 2
    distprobe watch RUN --config eval.yaml --partition gpu --gpus-per-node 1 --max-in-flight 4
    distprobe results RUN --format json
    distprobe retry RUN --failed

The cluster options are `ClusterConfig`'s, as for ``distprobe submit``; each job's folder is
``RUN/distprobe_eval/jobs/<claim>``. Every error is one line on stderr and exit status 2 (3: the checkpoint is being
evaluated already).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from distprobe.cluster.cli import add_cluster_arguments, config_from_args

BUSY = 3
"""``distprobe eval``'s exit status when another job evaluates the checkpoint under the same config."""


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _number(kind: type, minimum: float) -> Any:
    """An argparse type: a finite ``kind`` (int or float) >= ``minimum``, else a message naming the value."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number >= {minimum:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _fail(command: str, err: BaseException | str) -> int:
    sys.stderr.write(f"distprobe {command}: error: {err}\n")
    return 2


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distprobe eval`` arguments."""
    parser.add_argument("checkpoint", help="a Lightning .ckpt, a Distributed Checkpoint or a DeepSpeed directory")
    parser.add_argument("--config", required=True, help="the evaluation config (YAML)")
    parser.add_argument("--run-dir", help="the training's run directory, which must exist (default: the checkpoint's)")
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="submit and exit; the run's watcher, or distprobe results, ingests the result when the job ends",
    )
    add_cluster_arguments(parser)


def run_eval(args: argparse.Namespace) -> int:
    """Claim one checkpoint, submit its evaluation, wait for the job, ingest its published result."""
    from distprobe.report.results_table import render, rows_of
    from distprobe.service.checkpoints import CheckpointError
    from distprobe.service.config import EvalConfig
    from distprobe.service.job import default_run_dir, store_path
    from distprobe.service.store import ResultsStore, StoreError
    from distprobe.service.submission import SubmissionError, Submitted, Submitter

    _setup_logging()
    checkpoint = Path(args.checkpoint).resolve()
    try:
        config = EvalConfig.load(args.config)
        if not checkpoint.exists():
            raise CheckpointError(f"{args.checkpoint}: no such checkpoint")
        run_dir = Path(args.run_dir).resolve() if args.run_dir else default_run_dir(checkpoint)
        if not run_dir.is_dir():
            raise ValueError(f"--run-dir {args.run_dir}: no such directory; expected the training's run directory")
        cluster = config_from_args(args)
    except ValueError as err:
        return _fail("eval", err)
    store = ResultsStore(store_path(config, run_dir))
    submitter = Submitter(store, config, Path(args.config), run_dir, cluster, max_tries=1)
    try:
        outcome = submitter.submit(str(checkpoint), None, allow_final=True)
        if not isinstance(outcome, Submitted) and submitter.settle(outcome):  # its job had ended (killed?)
            outcome = submitter.submit(str(checkpoint), None, allow_final=True)
    except (StoreError, SubmissionError) as err:
        return _fail("eval", err)
    if not isinstance(outcome, Submitted):
        job = f"job {outcome.job_id}" if outcome.job_id else f"a job being submitted by {outcome.owner}"
        sys.stderr.write(
            f"distprobe eval: error: {checkpoint} is already being evaluated under config {outcome.config_hash} by "
            f"{job} (folder {outcome.job_dir}); wait for it to end (distprobe results {run_dir}), or cancel that job\n"
        )
        return BUSY
    sys.stdout.write(f"submitted {cluster.cluster} job {outcome.job_id}; logs in {outcome.job_dir}\n")
    if args.no_wait:
        return 0
    try:
        while True:
            record = store.checkpoint(str(checkpoint), config.fingerprint)
            assert record is not None
            if record.state != "submitted" or (record.claim == outcome.claim and not submitter.follow(record)):
                break
            time.sleep(1.0)
        record = store.checkpoint(str(checkpoint), config.fingerprint)
        assert record is not None
        if record.state != "done":
            sys.stderr.write(f"distprobe eval: job {outcome.job_id} failed: {record.error}\n")
            return 1
        (row,) = [r for r in rows_of(store, config.fingerprint) if r["checkpoint"] == str(checkpoint)]
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.write(render(store, config_hash=config.fingerprint))
    except StoreError as err:
        return _fail("eval", err)
    return 0


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distprobe watch`` arguments."""
    from distprobe.service.watch import WatchConfig

    defaults = WatchConfig.__dataclass_fields__
    parser.add_argument("run_dir", help="the training's run directory, searched for checkpoints")
    parser.add_argument("--config", required=True, help="the evaluation config (YAML)")
    service = parser.add_argument_group("service")
    for name, kind, minimum, text in (
        ("max_in_flight", int, 1, "jobs running at once, at most"),
        ("max_tries", int, 1, "attempts per checkpoint before it is marked failed"),
        ("every", int, 1, "evaluate every K-th checkpoint by step"),
        ("every_steps", int, 1, "evaluate only checkpoints whose global step is a multiple of N"),
        ("poll_s", float, 0.01, "seconds between polls of the run directory"),
        ("wait_for_run_dir_s", float, 0, "seconds to wait for a run directory that does not exist yet"),
        ("store_timeout_s", float, 0, "seconds a store access waits for another process's lock"),
    ):
        default = defaults[name].default
        service.add_argument(
            "--" + name.replace("_", "-"),
            type=_number(kind, minimum),
            default=default,
            help=f"{text} (default: {default})",
        )
    service.add_argument("--include-last", action="store_true", help="also evaluate last.ckpt (overwritten in place)")
    service.add_argument("--until-idle", action="store_true", help="exit once nothing is in flight or new")
    service.add_argument("--max-polls", type=_number(int, 1), default=None, help="exit after this many polls")
    add_cluster_arguments(parser)


def run_watch(args: argparse.Namespace) -> int:
    """Watch a run directory until SIGINT/SIGTERM."""
    from distprobe.service.watch import WatchConfig, Watcher

    _setup_logging()
    try:
        watcher = Watcher(
            WatchConfig(
                run_dir=Path(args.run_dir),
                config_path=Path(args.config),
                cluster=config_from_args(args),
                max_in_flight=args.max_in_flight,
                max_tries=args.max_tries,
                every=args.every,
                every_steps=args.every_steps,
                include_last=args.include_last,
                poll_s=args.poll_s,
                wait_for_run_dir_s=args.wait_for_run_dir_s,
                store_timeout_s=args.store_timeout_s,
            )
        )
        return watcher.run(max_polls=args.max_polls, until_idle=args.until_idle)
    except (ValueError, RuntimeError) as err:
        return _fail("watch", err)


_ELSEWHERE = "(a config whose results.store puts it elsewhere: pass that path as --store)"


def _store_of(args: argparse.Namespace) -> Path:
    from distprobe.service.store import default_store_path

    return Path(args.store) if args.store else default_store_path(Path(args.run_dir))


def add_results_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distprobe results`` arguments."""
    from distprobe.report.results_table import FORMATS

    parser.add_argument("run_dir", help="the training's run directory")
    parser.add_argument("--store", help="the results store (default: RUN_DIR/distprobe_eval/results.sqlite)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="table (default), json or csv")
    parser.add_argument("--config-hash", help="only this config's rows (a prefix of the hash will do)")
    parser.add_argument("--full-paths", action="store_true", help="print checkpoints' full paths in the table")
    parser.add_argument(
        "--timeout-s", type=_number(float, 0), default=10.0, help="seconds to wait for a locked store (default: 10)"
    )


def run_results(args: argparse.Namespace) -> int:
    """Print the results of a run directory, after ingesting what finished jobs have published."""
    from distprobe.report.results_table import render
    from distprobe.service.store import ResultsStore, StoreError
    from distprobe.service.submission import ingest_published

    store_file = _store_of(args)
    if not store_file.is_file():
        return _fail("results", f"no results store at {store_file}; has a watcher or eval run yet? {_ELSEWHERE}")
    store = ResultsStore(store_file, timeout_s=args.timeout_s)
    try:
        ingest_published(store)
        config_hash = _config_hash(store, args.config_hash)
        sys.stdout.write(render(store, args.format, full_paths=args.full_paths, config_hash=config_hash))
    except (StoreError, ValueError) as err:
        return _fail("results", err)
    return 0


def _config_hash(store: Any, given: str | None) -> str | None:
    """The store's one config hash that starts with ``given`` (the table shows 8 characters), or None for all.

    Raises:
        ValueError: ``given`` matches none of the store's configs, or several.
    """
    if given is None:
        return None
    hashes = sorted({r.config_hash for r in store.checkpoints()})
    matches = [h for h in hashes if h.startswith(given)]
    if len(matches) != 1:
        raise ValueError(f"--config-hash {given!r} matches {len(matches)} of the store's configs {hashes}")
    return matches[0]


def add_retry_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distprobe retry`` arguments."""
    parser.add_argument("run_dir", help="the training's run directory")
    parser.add_argument("--failed", action="store_true", help="every failed checkpoint")
    parser.add_argument("--checkpoint", help="one checkpoint (any state but in flight)")
    parser.add_argument(
        "--config-hash", help="only under this config, a prefix of its hash will do (default: every config)"
    )
    parser.add_argument("--store", help="the results store (default: RUN_DIR/distprobe_eval/results.sqlite)")


def run_retry(args: argparse.Namespace) -> int:
    """Put checkpoints back to pending, with no tries counted: the watcher evaluates them again."""
    from distprobe.service.store import ResultsStore, StoreError

    if not args.failed and args.checkpoint is None:
        return _fail("retry", "nothing to retry; give --failed, --checkpoint PATH, or both")
    store_file = _store_of(args)
    if not store_file.is_file():
        return _fail("retry", f"no results store at {store_file}; {_ELSEWHERE}")
    checkpoint = str(Path(args.checkpoint).resolve()) if args.checkpoint else None
    try:
        store = ResultsStore(store_file)
        config_hash = _config_hash(store, args.config_hash)  # a prefix, as results takes it
        records = store.retry(failed=args.failed, checkpoint=checkpoint, config_hash=config_hash)
    except (StoreError, ValueError) as err:
        return _fail("retry", err)
    if not records and checkpoint is not None:
        return _fail("retry", f"{checkpoint} is not in {store_file}, or is being evaluated now")
    for record in records:
        sys.stdout.write(f"pending again: {record.path} (config {record.config_hash}; was {record.state})\n")
    sys.stdout.write(f"{len(records)} checkpoint(s) pending; a running watcher submits them at its next poll\n")
    return 0


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``eval``, ``watch``, ``results`` and ``retry`` to the main CLI's sub-commands."""
    for name, help_text, add, run in (
        ("eval", "evaluate one checkpoint with the full probing protocol", add_eval_arguments, run_eval),
        ("watch", "evaluate every new checkpoint of a run, once each, on the cluster", add_watch_arguments, run_watch),
        ("results", "print the probing results of a run, per checkpoint", add_results_arguments, run_results),
        ("retry", "put failed (or chosen) checkpoints back to pending", add_retry_arguments, run_retry),
    ):
        parser = sub.add_parser(name, help=help_text)
        add(parser)
        parser.set_defaults(run=run)
