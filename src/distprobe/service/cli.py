"""``distprobe eval | watch | results``: the probing service's commands.

    distprobe eval RUN/checkpoints/epoch=3-step=400.ckpt --config eval.yaml --cluster local --tasks-per-node 2
    distprobe watch RUN --config eval.yaml --partition gpu --gpus-per-node 1 --max-in-flight 4
    distprobe results RUN

The cluster options are `ClusterConfig`'s, as for ``distprobe submit``; jobs' logs default to
``RUN/distprobe_eval/jobs/<job id>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from distprobe.cluster.cli import add_cluster_arguments, config_from_args


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distprobe eval`` arguments."""
    parser.add_argument("checkpoint", help="a Lightning .ckpt, a Distributed Checkpoint or a DeepSpeed directory")
    parser.add_argument("--config", required=True, help="the evaluation config (YAML)")
    parser.add_argument("--run-dir", help="the training's run directory (default: the checkpoint's)")
    parser.add_argument("--no-wait", action="store_true", help="submit and exit without waiting for the result")
    add_cluster_arguments(parser)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate one checkpoint as a submitit job (``--cluster debug``: in this process)."""
    from distprobe.cluster.submitit_launcher import submit
    from distprobe.service.checkpoints import CheckpointError
    from distprobe.service.config import EvalConfig
    from distprobe.service.job import default_jobs_folder, default_run_dir, store_path
    from distprobe.service.report import render
    from distprobe.service.store import ResultsStore
    from distprobe.service.watch import ENTRY_POINT

    _setup_logging()
    checkpoint = Path(args.checkpoint)
    try:
        config = EvalConfig.load(args.config)
        if not checkpoint.exists():
            raise CheckpointError(f"{checkpoint}: no such checkpoint")
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(checkpoint)
        cluster = config_from_args(args, folder=default_jobs_folder(run_dir.resolve()))
    except ValueError as err:
        sys.stderr.write(f"distprobe eval: error: {err}\n")
        return 2
    # Positional: submit's own second parameter is called config.
    job = submit(
        ENTRY_POINT, cluster, str(checkpoint.resolve()), str(Path(args.config).resolve()), str(run_dir.resolve())
    )
    sys.stdout.write(f"submitted {cluster.cluster} job {job.job_id}; logs in {job.paths.folder}\n")
    if args.no_wait:
        return 0
    try:
        summary = job.results()[0]  # rank 0's: every rank returns the same summary
    except Exception as err:  # noqa: BLE001 - the job's failure is reported, with submitit's log excerpt
        sys.stderr.write(f"distprobe eval: job {job.job_id} failed: {err}\n")
        return 1
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
    sys.stdout.write(render(ResultsStore(store_path(config, run_dir.resolve()))))
    return 0


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distprobe watch`` arguments."""
    from distprobe.service.watch import WatchConfig

    defaults = WatchConfig.__dataclass_fields__
    parser.add_argument("run_dir", help="the training's run directory, searched for checkpoints")
    parser.add_argument("--config", required=True, help="the evaluation config (YAML)")
    service = parser.add_argument_group("service")
    for name, kind, text in (
        ("max_in_flight", int, "jobs running at once, at most"),
        ("max_tries", int, "attempts per checkpoint before it is marked failed"),
        ("every", int, "evaluate every K-th checkpoint by step"),
        ("every_steps", int, "evaluate only checkpoints whose global step is a multiple of N"),
        ("poll_s", float, "seconds between polls of the run directory"),
    ):
        default = defaults[name].default
        service.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=default, help=f"{text} (default: {default})"
        )
    service.add_argument("--include-last", action="store_true", help="also evaluate last.ckpt (overwritten in place)")
    service.add_argument("--until-idle", action="store_true", help="exit once nothing is in flight or new")
    service.add_argument("--max-polls", type=int, default=None, help="exit after this many polls")
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
            )
        )
        return watcher.run(max_polls=args.max_polls, until_idle=args.until_idle)
    except (ValueError, RuntimeError) as err:
        sys.stderr.write(f"distprobe watch: error: {err}\n")
        return 2


def add_results_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distprobe results`` arguments."""
    parser.add_argument("run_dir", help="the training's run directory")
    parser.add_argument("--store", help="the results store (default: RUN_DIR/distprobe_eval/results.sqlite)")
    parser.add_argument("--full-paths", action="store_true", help="print checkpoints' full paths")


def run_results(args: argparse.Namespace) -> int:
    """Print the results table of a run directory."""
    from distprobe.service.report import render
    from distprobe.service.store import ResultsStore, default_store_path

    store = Path(args.store) if args.store else default_store_path(Path(args.run_dir))
    if not store.is_file():
        sys.stderr.write(f"distprobe results: error: no results store at {store}; has a watcher or eval run yet?\n")
        return 2
    sys.stdout.write(render(ResultsStore(store), full_paths=args.full_paths))
    return 0


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``eval``, ``watch`` and ``results`` to the main CLI's sub-commands."""
    for name, help_text, add, run in (
        ("eval", "evaluate one checkpoint with the full probing protocol", add_eval_arguments, run_eval),
        ("watch", "evaluate every new checkpoint of a run, once each, on the cluster", add_watch_arguments, run_watch),
        ("results", "print the probing results of a run, per checkpoint", add_results_arguments, run_results),
    ):
        parser = sub.add_parser(name, help=help_text)
        add(parser)
        parser.set_defaults(run=run)
