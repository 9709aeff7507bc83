"""`distprobe report RUN_DIR`: every probe's loss and accuracy over steps as a PNG, and a markdown summary.

It reads a run's logs (Lightning's CSVLogger, TensorBoard event files, the probing service's results store) and
needs matplotlib (``pip install 'distprobe[report]'``).

Example:
    >>> from distprobe.report import write_report
    >>> files = write_report("distprobe_runs/demo")  # doctest: +SKIP
    >>> print(files.plot)  # doctest: +SKIP
    distprobe_runs/demo/report.png
"""

from distprobe.report.readers import NoLogsError, TensorBoardUnavailableError
from distprobe.report.write import ReportFiles, write_report

__all__ = ["NoLogsError", "ReportFiles", "TensorBoardUnavailableError", "write_report"]
