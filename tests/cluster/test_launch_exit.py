"""A script that ends with ``sys.exit(...)`` under the launcher: its status is the job's, read from the job.

submitit records a task's returned value or its Exception; a `SystemExit` left neither, so the common
``sys.exit(main())`` of a script that succeeded made ``distprobe submit --wait`` (and ``job.result()``) report a
failure ("has not produced any output"), and ``sys.exit(3)`` said nothing of the 3. Real processes (the local
executor); the preemption path's own `SystemExit` is left as it is (tests/cluster/test_launch_local.py).
"""

from __future__ import annotations

import pytest

from distprobe.cluster import ClusterConfig, submit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_a_scripts_exit_status_is_the_jobs(tmp_path):
    ok, failing = tmp_path / "ok.py", tmp_path / "failing.py"
    ok.write_text("import sys\nprint('trained')\nsys.exit(0)\n")
    failing.write_text("import sys\nsys.exit(3)\n")
    config = ClusterConfig(cluster="local", folder=str(tmp_path / "%j"))
    jobs = submit(str(ok), config), submit(str(failing), config)  # both at once: one wait
    assert jobs[0].result() is None
    with pytest.raises(Exception, match=r"failing\.py exited with status 3"):
        jobs[1].result()
