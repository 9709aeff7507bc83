"""`write_report`: read a run's logs, write its plot and its markdown summary."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from distprobe.report import plot, summary
from distprobe.report.checkpoints import saved_head_orders
from distprobe.report.probes import bank_names, probes_of
from distprobe.report.readers import NoLogsError, read_run

log = logging.getLogger(__name__)

PLOT_NAME = "report.png"
SUMMARY_NAME = "report.md"


@dataclass(frozen=True)
class ReportFiles:
    """What `write_report` wrote."""

    plot: Path
    """The PNG of every probe's loss and accuracy over steps."""
    summary: Path
    """The markdown summary of the best heads."""


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> ReportFiles:
    """Read every log under run_dir, write report.png and report.md (default: into run_dir), return their paths.

    The logs are Lightning's CSVLogger ``metrics.csv``, TensorBoard event files (with the ``tensorboard`` package),
    and the probing service's store ``distprobe_eval/results.sqlite``, anywhere under ``run_dir``.

    Args:
        run_dir: The training's run directory (its Trainer's ``default_root_dir``, or its logger's folder).
        out_dir: Where to write the two files; created if needed. None: ``run_dir``.

    Returns:
        The paths of the PNG and the markdown written.

    Raises:
        NoLogsError: ``run_dir`` holds no log with a probe's metrics.
        TensorBoardUnavailableError: it holds TensorBoard event files and ``tensorboard`` is not installed.
        ImportError: matplotlib is not installed.

    Example:
        >>> files = write_report("distprobe_runs/demo")  # doctest: +SKIP
        >>> files.plot.name, files.summary.name  # doctest: +SKIP
        ('report.png', 'report.md')
    """
    logs = read_run(run_dir)
    probes = probes_of(logs, saved_head_orders(logs.run_dir, bank_names(logs)))
    if not probes:
        read = ", ".join(str(path) for path, _ in logs.sources)
        raise NoLogsError(
            f"distprobe report: the logs under '{logs.run_dir}' ({read}) hold no probe's metrics: expected keys "
            "such as 'eval/{name}_top1' logged by OnlineProbe, OnlineProbeBank, OnlineKNN or OnlineRidge, or the "
            "probing service's results; pass the directory of a run trained with distprobe's callbacks."
        )
    out = Path(out_dir) if out_dir is not None else logs.run_dir
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(plot=out / PLOT_NAME, summary=out / SUMMARY_NAME)
    plot.save(probes, files.plot, title=f"distprobe report: {logs.run_dir}")
    files.summary.write_text(summary.render(logs, probes, plot=files.plot))
    log.info("distprobe report: %d probe(s) of %s -> %s, %s", len(probes), logs.run_dir, files.plot, files.summary)
    return files
