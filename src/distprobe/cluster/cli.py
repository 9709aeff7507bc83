"""``distprobe submit``: the command-line face of `distprobe.cluster.submit` and `render_sbatch`.

The main CLI adds the sub-command with `add_submit_arguments(parser)` and runs it with `run_submit(args)`;
``python -m distprobe.cluster`` runs the same thing on its own. The cluster options are derived from the fields of
`ClusterConfig` (name, type, help), so a new field is a new option with no change here.

    python -m distprobe.cluster --cluster local --tasks-per-node 2 --wait distprobe.cluster.smoke:train steps=40
    python -m distprobe.cluster --nodes 2 --tasks-per-node 8 --gpus-per-node 8 train.py --lr 0.1
    python -m distprobe.cluster --render-sbatch requeue --partition gpu train.py > job.sbatch

Options go before the entry point; everything after it belongs to the entry point (as with srun and torchrun).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
import sys
import textwrap
import types
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from distprobe.cluster.config import ClusterConfig
from distprobe.cluster.entry import EntryPoint

_DEST_PREFIX = "submit_"
# Fields that need a collecting option rather than a plain value.
_SPECIAL = {"sbatch_options", "srun_args"}


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, read from the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _value_type(hint: Any) -> Any:
    """Strip ``| None`` from a type hint."""
    if get_origin(hint) in (Union, types.UnionType):
        members = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return hint


def _parse_option(text: str) -> tuple[str, str | bool]:
    key, sep, value = text.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"--sbatch-option {text!r}: expected KEY=VALUE or KEY (a flag)")
    return key, value if sep else True


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``distprobe submit`` arguments to `parser` (a sub-command parser of the main CLI).

    Args:
        parser: the parser to extend; `run_submit` reads the namespace it produces.
    """
    parser.add_argument(
        "entry_point",
        help="what every task runs: 'package.module:function' or the path of a .py script",
    )
    parser.add_argument(
        "entry_args",
        nargs=argparse.REMAINDER,
        metavar="ARG",
        help="everything after the entry point is its own (options for distprobe go before it, as with srun or "
        "torchrun): a script's command line; for a "
        "function, NAME=VALUE for a keyword and VALUE for a positional argument, VALUE read as a Python literal "
        "when it is one (steps=40 gives the int 40) and as a string otherwise",
    )
    add_cluster_arguments(parser)
    actions = parser.add_argument_group("what to do")
    actions.add_argument(
        "--wait",
        dest=_DEST_PREFIX + "wait",
        action="store_true",
        help="wait for the job, print every task's result as JSON, and exit non-zero if it failed",
    )
    actions.add_argument(
        "--render-sbatch",
        dest=_DEST_PREFIX + "render_sbatch",
        metavar="TEMPLATE",
        help="print the sbatch script of TEMPLATE (single-node, multi-node-srun, multi-node-torchrun, requeue, or "
        "a .sbatch path) for a .py entry point instead of submitting",
    )


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per `ClusterConfig` field to `parser` (`config_from_args` reads them back).

    ``distprobe submit``, ``distprobe eval`` and ``distprobe watch`` share these options.
    """
    hints = get_type_hints(ClusterConfig)
    docs = _field_docs(ClusterConfig)
    defaults = ClusterConfig()
    group = parser.add_argument_group("cluster", "fields of distprobe.cluster.ClusterConfig")
    for field in dataclasses.fields(ClusterConfig):
        if field.name in _SPECIAL:
            continue
        option = "--" + field.name.replace("_", "-")
        hint = _value_type(hints[field.name])
        # argparse %-formats help strings: "%j" in a folder default must be escaped.
        help_text = f"{docs.get(field.name, '')} (default: {getattr(defaults, field.name)})".replace("%", "%%")
        dest = _DEST_PREFIX + field.name
        if hint is not bool:
            group_kwargs: dict[str, Any] = {"metavar": field.name.upper()}
        if hint is bool:
            group.add_argument(option, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(hint) is Literal:
            group.add_argument(option, dest=dest, choices=get_args(hint), default=None, help=help_text)
        else:
            group.add_argument(option, dest=dest, type=hint, default=None, help=help_text, **group_kwargs)
    group.add_argument(
        "--sbatch-option",
        dest=_DEST_PREFIX + "sbatch_options",
        action="append",
        type=_parse_option,
        default=None,
        metavar="KEY[=VALUE]",
        help=f"{docs['sbatch_options']} Repeat for several.".replace("%", "%%"),
    )
    group.add_argument(
        "--srun-arg",
        dest=_DEST_PREFIX + "srun_args",
        action="append",
        default=None,
        metavar="ARG",
        help=f"{docs['srun_args']} Repeat for several; write --srun-arg=--flag for an argument with dashes.".replace(
            "%", "%%"
        ),
    )


def config_from_args(args: argparse.Namespace, **defaults: Any) -> ClusterConfig:
    """The `ClusterConfig` given on the command line (fields not given keep `defaults`, else the class's)."""
    options: dict[str, Any] = dict(defaults)
    for field in dataclasses.fields(ClusterConfig):
        value = getattr(args, _DEST_PREFIX + field.name, None)
        if value is None:
            continue
        options[field.name] = dict(value) if field.name == "sbatch_options" else value
    return ClusterConfig.from_dict(options)


def _render(args: argparse.Namespace, config: ClusterConfig) -> str:
    from distprobe.cluster.sbatch import render_sbatch

    entry = EntryPoint.resolve(args.entry_point)
    if entry.kind != "script":
        raise ValueError(
            f"--render-sbatch runs a program; {args.entry_point!r} is a function. Give the path of a .py script, "
            "or submit the function without --render-sbatch"
        )
    return render_sbatch(args.submit_render_sbatch, config, [str(entry.target), *args.entry_args])


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def function_arguments(words: Sequence[str]) -> tuple[list[Any], dict[str, Any]]:
    """Split a function entry point's command-line words into positional and keyword arguments.

    Example:
        >>> function_arguments(["3", "steps=40", "name=run-1"])
        ([3], {'steps': 40, 'name': 'run-1'})
    """
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if sep and name.isidentifier():
            keywords[name] = _literal(value)
        elif keywords:
            raise ValueError(f"entry point argument {word!r}: a positional argument cannot follow keyword arguments")
        else:
            positional.append(_literal(word))
    return positional, keywords


def run_submit(args: argparse.Namespace) -> int:
    """Run ``distprobe submit`` for a namespace parsed with `add_submit_arguments`; returns the exit status.

    Bad parameters are reported on stderr (status 2) before anything is submitted.
    """
    from distprobe.cluster.submitit_launcher import submit

    try:
        config = config_from_args(args)
        if args.submit_render_sbatch:
            sys.stdout.write(_render(args, config))
            return 0
        if EntryPoint.resolve(args.entry_point).kind == "script":
            job = submit(args.entry_point, config, *args.entry_args)
        else:
            positional, keywords = function_arguments(args.entry_args)
            job = submit(args.entry_point, config, *positional, **keywords)
    except ValueError as error:
        sys.stderr.write(f"distprobe submit: error: {error}\n")
        return 2
    sys.stdout.write(f"submitted {config.cluster} job {job.job_id}; logs in {job.paths.folder}\n")
    if not args.submit_wait:
        return 0
    try:
        results = job.results()
    except Exception as error:  # noqa: BLE001 - any failure of the job is reported, with submitit's log excerpt
        sys.stderr.write(f"distprobe submit: job {job.job_id} failed: {error}\n")
        return 1
    sys.stdout.write(json.dumps(results, default=str) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distprobe.cluster``: the ``distprobe submit`` command on its own."""
    parser = argparse.ArgumentParser(
        prog="python -m distprobe.cluster", description="Submit a training to Slurm (or run it locally)."
    )
    add_submit_arguments(parser)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_submit(args)


__all__ = [
    "add_cluster_arguments",
    "add_submit_arguments",
    "config_from_args",
    "function_arguments",
    "main",
    "run_submit",
]

if __name__ == "__main__":
    raise SystemExit(main())
