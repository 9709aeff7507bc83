"""Fill the sbatch templates of ``slurm/`` from a `ClusterConfig` and a program, quoting every value.

A template is a plain sbatch script with ``{{ name }}`` placeholders. Rules, so that a reader can predict the output:

- every value is quoted with `shlex.quote` (a list becomes its quoted words separated by spaces), so a partition
  named ``a;rm -rf /`` stays one word: sbatch rejects it as an unknown partition and nothing runs;
- a line holding a placeholder whose value is unset (no partition, no GPUs, no memory limit) is left out;
- ``{{ sbatch_options }}`` stands alone on its line and becomes one ``#SBATCH --key=value`` line per extra option;
- ``{{ run_dir }}`` is the job folder with ``%j`` turned into ``${SLURM_JOB_ID}`` (outside the quotes);
- a value with a newline, a carriage return or a NUL byte is refused: no quoting makes it one line.

Example:
    >>> from distprobe.cluster.config import ClusterConfig
    >>> script = render_sbatch("single-node", ClusterConfig(partition="gpu"), ["train.py", "--lr", "0.1"])
    >>> "#SBATCH --partition=gpu" in script
    True
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

from distprobe.cluster.config import ClusterConfig, check_shell_safe

TemplateName = Literal["single-node", "multi-node-srun", "multi-node-torchrun", "requeue"]

TEMPLATES_ENV = "DISTPROBE_SBATCH_TEMPLATES"
"""A folder of templates to use instead of the repository's ``slurm/`` (for edited copies)."""

_PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")
_PLACEHOLDER_AND_SPACE = re.compile(r"\{\{ (\w+) \}\} ?")
_BLOCK = "sbatch_options"
_SLURM_JOB_ID = "${SLURM_JOB_ID}"


def templates_dir() -> Path:
    """The folder holding the templates: ``$DISTPROBE_SBATCH_TEMPLATES``, else the source checkout's ``slurm/``.

    Raises:
        FileNotFoundError: if neither exists (an installed wheel has no ``slurm/``: set the variable).
    """
    override = os.environ.get(TEMPLATES_ENV)
    candidates = [Path(override)] if override else [Path(__file__).resolve().parents[3] / "slurm"]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"no sbatch template folder at {candidates[0]}; set {TEMPLATES_ENV} to a folder holding "
        f"{[f'{name}.sbatch' for name in get_args(TemplateName)]} (copies of distprobe's slurm/)"
    )


def _quote(value: object) -> str:
    text = str(value)
    check_shell_safe("sbatch template value", text)
    return shlex.quote(text)


def _quote_words(words: Sequence[str]) -> str:
    return " ".join(_quote(word) for word in words)


def _quote_with_job_id(folder: str) -> str:
    # Each piece is quoted on its own; the job id variable stays outside the quotes so the shell expands it.
    return _SLURM_JOB_ID.join(_quote(piece) if piece else "" for piece in folder.split("%j"))


def _log_dir(folder: str) -> str:
    # sbatch opens --output before the job starts and does not create folders: log next to the job folders.
    parts = Path(folder).parts
    for index, part in enumerate(parts):
        if "%j" in part:
            return str(Path(*parts[:index])) if index else "."
    return folder


def template_values(config: ClusterConfig, program: Sequence[str], python: str | None = None) -> dict[str, str | None]:
    """The quoted value of every placeholder (None for an unset one, whose line is left out)."""
    if isinstance(program, str) or not program or not all(isinstance(word, str) for word in program):
        raise ValueError(
            f"render_sbatch: program={program!r}; expected a non-empty list of strings, e.g. ['train.py', '--lr', '1']"
        )
    cpus_per_node = config.cpus_per_task * config.tasks_per_node if config.cpus_per_task else None
    mem = None
    if config.mem_gb is not None:
        mem = f"{int(config.mem_gb)}G" if config.mem_gb == int(config.mem_gb) else f"{int(config.mem_gb * 1024)}M"
    raw: dict[str, object | None] = {
        "job_name": config.job_name,
        "partition": config.partition,
        "nodes": config.nodes,
        "tasks_per_node": config.tasks_per_node,
        "gpus_per_node": config.gpus_per_node or None,
        "cpus_per_task": config.cpus_per_task,
        "cpus_per_node": cpus_per_node,
        "mem": mem,
        "time_min": config.time_min,
        "signal_delay_s": config.signal_delay_s,
        "log_dir": _log_dir(config.folder),
    }
    values: dict[str, str | None] = {key: None if value is None else _quote(value) for key, value in raw.items()}
    values["run_dir"] = _quote_with_job_id(config.folder)
    values["srun_args"] = _quote_words(config.srun_args)
    values["python"] = _quote(python or sys.executable)
    values["program"] = _quote_words(program)
    values[_BLOCK] = "\n".join(
        f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={_quote(value)}"
        for key, value in sorted(config.sbatch_options.items())
    )
    return values


def _fill(match: re.Match[str], values: dict[str, str | None]) -> str:
    value = values[match.group(1)] or ""
    # An empty value (no srun_args) takes its following space with it: "srun python", not "srun  python".
    trailing_space = match.group(0)[len(match.group(0).rstrip(" ")) :]
    return value + trailing_space if value else ""


def render_template(text: str, values: dict[str, str | None], *, source: str = "template") -> str:
    """Substitute ``{{ name }}`` placeholders in `text` following the module's rules.

    Raises:
        ValueError: on a placeholder with no value defined, or ``{{ sbatch_options }}`` not alone on its line.
    """
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        names = _PLACEHOLDER.findall(line)
        unknown = [name for name in names if name not in values]
        if unknown:
            raise ValueError(f"{source}:{number}: unknown placeholder(s) {unknown}; known: {sorted(values)}")
        if _BLOCK in names:
            if line.strip() != f"{{{{ {_BLOCK} }}}}":
                raise ValueError(f"{source}:{number}: {{{{ {_BLOCK} }}}} must stand alone on its line")
            if values[_BLOCK]:
                lines.append(str(values[_BLOCK]))
            continue
        if any(values[name] is None for name in names):
            continue
        lines.append(_PLACEHOLDER_AND_SPACE.sub(lambda match: _fill(match, values), line))
    return "\n".join(lines) + "\n"


def render_sbatch(
    template: TemplateName | str | Path,
    config: ClusterConfig,
    program: Sequence[str],
    *,
    python: str | None = None,
) -> str:
    """Render an sbatch template for `config` running `program`.

    Args:
        template: one of ``"single-node"``, ``"multi-node-srun"``, ``"multi-node-torchrun"``, ``"requeue"``, or the
            path of an edited template.
        config: the same cluster parameters as `distprobe.cluster.submit` (``cluster`` must be ``"slurm"``).
        program: what runs in every task after the Python interpreter: ``["train.py", "--lr", "0.1"]`` or
            ``["-m", "distprobe.cluster.smoke", ...]``; for ``multi-node-torchrun``, what torchrun runs.
        python: the interpreter on the compute nodes; default: this one (`sys.executable`).

    Returns:
        The script text.

    Raises:
        ValueError: on an unknown template name (the message lists them), a template that does not fit the
            config (e.g. ``single-node`` with ``nodes=2``), or a value that cannot be quoted safely.
    """
    if config.cluster != "slurm":
        raise ValueError(f"render_sbatch: config.cluster={config.cluster!r}; sbatch templates are for cluster='slurm'")
    if isinstance(template, Path) or str(template).endswith(".sbatch"):
        path = Path(template)
        if not path.is_file():
            raise ValueError(f"render_sbatch: template file {str(path)!r} does not exist")
    else:
        names = get_args(TemplateName)
        if template not in names:
            raise ValueError(f"render_sbatch: unknown template {template!r}; expected one of {list(names)}")
        if template == "single-node" and config.nodes != 1:
            raise ValueError(
                f"render_sbatch: template 'single-node' with nodes={config.nodes}; "
                "use 'multi-node-srun' or 'multi-node-torchrun', or nodes=1"
            )
        path = templates_dir() / f"{template}.sbatch"
    return render_template(path.read_text(), template_values(config, program, python), source=str(path))
