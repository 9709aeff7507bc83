"""The sbatch templates: golden files, `bash -n`, and quoting that keeps hostile values inert.

Regenerate the golden files after an intended template change with ``DISTPROBE_UPDATE_GOLDEN=1 pytest ...``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from distprobe.cluster import ClusterConfig
from distprobe.cluster.sbatch import render_sbatch, templates_dir

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TEMPLATES = ["single-node", "multi-node-srun", "multi-node-torchrun", "requeue"]
HOSTILE_PARTITION = "a;rm -rf /"
PROGRAM = ["train.py", "--run-name", "it's $(whoami) `id`; rm -rf /", "--lr", "0.1"]


def _config(template: str) -> ClusterConfig:
    return ClusterConfig(
        nodes=1 if template == "single-node" else 4,
        tasks_per_node=8,
        gpus_per_node=8,
        cpus_per_task=6,
        mem_gb=480,
        time_min=240,
        partition=HOSTILE_PARTITION,
        job_name="probe run",
        folder="/shared/runs dir/%j",
        sbatch_options={"account": "ml team", "exclusive": True, "qos": "high"},
        srun_args=["--cpu-bind=none", "--label"],
    )


def _bash_n(script: str) -> None:
    result = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_matches_golden_file(template):
    rendered = render_sbatch(template, _config(template), PROGRAM, python="/opt/venv/bin/python")
    golden = GOLDEN / f"{template}.sbatch"
    if os.environ.get("DISTPROBE_UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"{template} changed; regenerate with DISTPROBE_UPDATE_GOLDEN=1"
    _bash_n(rendered)


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_parses_rendered_minimal_and_raw(template):
    _bash_n((templates_dir() / f"{template}.sbatch").read_text())
    minimal = render_sbatch(template, ClusterConfig(), ["train.py"])
    _bash_n(minimal)
    # Unset values drop their lines rather than leaving empty directives.
    assert "--partition" not in minimal
    assert "--gpus-per-node" not in minimal
    assert "--mem" not in minimal
    assert "{{" not in minimal


def test_hostile_values_stay_single_words():
    rendered = render_sbatch("single-node", _config("single-node"), PROGRAM, python="python3")
    assert "#SBATCH --partition='a;rm -rf /'" in rendered
    assert "#SBATCH --job-name='probe run'" in rendered
    assert "#SBATCH --account='ml team'" in rendered
    assert "run_dir='/shared/runs dir/'${SLURM_JOB_ID}" in rendered
    assert """'it'"'"'s $(whoami) `id`; rm -rf /'""" in rendered


def test_program_words_reach_the_program_unchanged(tmp_path):
    """Run the rendered launch line with stand-ins for srun and scontrol (the real ones: test_launch_slurm.py)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    out = tmp_path / "argv.txt"
    program = ["-c", f"import sys; open({str(out)!r}, 'w').write(repr(sys.argv[1:]))", *PROGRAM[1:]]
    config = ClusterConfig(folder=str(tmp_path / "runs" / "%j"), partition=HOSTILE_PARTITION)
    script = render_sbatch("single-node", config, program)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
    }
    subprocess.run(["bash", "-c", script], env=env, check=True, cwd=tmp_path, timeout=60)
    assert out.read_text() == repr(PROGRAM[1:])
    assert (tmp_path / "runs" / "42").is_dir()


def test_render_errors():
    with pytest.raises(ValueError, match=r"unknown template 'multinode'; expected one of \['single-node'"):
        render_sbatch("multinode", ClusterConfig(), ["train.py"])
    with pytest.raises(ValueError, match="'single-node' with nodes=2"):
        render_sbatch("single-node", ClusterConfig(nodes=2), ["train.py"])
    with pytest.raises(ValueError, match="templates are for cluster='slurm'"):
        render_sbatch("single-node", ClusterConfig(cluster="local"), ["train.py"])
    with pytest.raises(ValueError, match="contains a newline"):
        render_sbatch("single-node", ClusterConfig(), ["train.py", "a\nb"])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        render_sbatch("single-node", ClusterConfig(), "train.py")  # type: ignore[arg-type]
