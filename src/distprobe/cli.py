"""`distprobe demo | submit | eval | watch | results | report`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields


def _demo(args: argparse.Namespace) -> int:
    from distprobe.demo import DemoConfig, run_demo

    # The demo's options are named as DemoConfig's fields and only the given ones are in `args` (their default is
    # SUPPRESS): DemoConfig holds the one copy of the defaults.
    given = {f.name: getattr(args, f.name) for f in fields(DemoConfig) if hasattr(args, f.name)}
    result = run_demo(DemoConfig(**given))
    final = result["final"]
    if final and result["is_global_zero"]:
        summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items()))
        sys.stdout.write(f"final: {summary}\nlogs: {result['log_dir']}\n")
    return 0


def _report(args: argparse.Namespace) -> int:
    from distprobe.report import NoLogsError, write_report

    try:
        files = write_report(args.run_dir, args.out)
    except (NoLogsError, ImportError) as err:  # ImportError: no tensorboard for TensorBoard logs, or no matplotlib
        sys.stderr.write(f"{err}\n")
        return 2
    sys.stdout.write(f"plot: {files.plot}\nsummary: {files.summary}\n\n{files.summary.read_text()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="distprobe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="SimCLR on 8x8 digits with live online probes (CPU, about a minute)",
        argument_default=argparse.SUPPRESS,  # an option not given keeps DemoConfig's default
    )
    demo.add_argument("--epochs", type=int)
    demo.add_argument("--batch-size", type=int)
    demo.add_argument("--devices", type=int, help="CPU processes; >1 trains with DDP over gloo")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--out-dir")
    demo.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    demo.add_argument(
        "--probe-data",
        choices=["pretraining-labels", "labeled-subset"],
        help="labeled-subset: pretrain on unlabeled digits, probes train on a labeled subset of their own",
    )
    demo.set_defaults(run=_demo)
    try:
        from distprobe.cluster.cli import add_submit_arguments, run_submit
    except ImportError:  # the launcher is optional until it lands
        pass
    else:
        submit = sub.add_parser("submit", help="submit a probed training to Slurm (or locally) through submitit")
        add_submit_arguments(submit)
        submit.set_defaults(run=run_submit)
    from distprobe.service.cli import add_service_commands

    add_service_commands(sub)
    report = sub.add_parser(
        "report", help="plot every probe's loss and accuracy over steps, and summarize the best heads"
    )
    report.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run's directory: CSVLogger or TensorBoard logs, or the service's store"
    )
    report.add_argument(
        "--out", metavar="DIR", default=None, help="where to write report.png and report.md (default: RUN_DIR)"
    )
    report.set_defaults(run=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line."""
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
