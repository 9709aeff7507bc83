"""Training entry points: a Python callable, a ``"module:function"`` string or a path to a ``.py`` script.

`EntryPoint.resolve` checks at submit time that the entry point exists, so a typo fails before a job is queued;
`EntryPoint.run` calls it inside each task.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import runpy
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class EntryPoint:
    """A resolved training entry point; picklable, so it travels to every task."""

    kind: Literal["callable", "module", "script"]
    target: Any
    """The callable itself, ``"module:function"``, or the script's absolute path."""

    @property
    def name(self) -> str:
        """A short human-readable name, used for the job name and in logs."""
        if self.kind == "callable":
            return getattr(self.target, "__qualname__", type(self.target).__name__)
        if self.kind == "module":
            return str(self.target).rsplit(":", 1)[1]
        return Path(self.target).stem

    @classmethod
    def resolve(cls, entry_point: Callable[..., Any] | str | Path) -> EntryPoint:
        """Check an entry point and say what kind it is.

        Args:
            entry_point: a callable; ``"package.module:function"``; or the path of a Python script.

        Returns:
            The resolved entry point.

        Raises:
            ValueError: if the script does not exist, the module cannot be found, or the module has no such
                callable (the message lists the callables it has).
        """
        if callable(entry_point) and not isinstance(entry_point, (str, Path)):
            return cls("callable", entry_point)
        if not isinstance(entry_point, (str, Path)):
            raise ValueError(
                f"entry point {entry_point!r} is a {type(entry_point).__name__}; expected a callable, "
                "'module:function' or the path of a .py script"
            )
        text = str(entry_point)
        if text.endswith(".py") or isinstance(entry_point, Path) or "/" in text:
            return cls._resolve_script(Path(text))
        if ":" in text:
            return cls._resolve_function(text)
        raise ValueError(
            f"entry point {text!r} is neither 'module:function' nor the path of a .py script; "
            "e.g. 'distprobe.cluster.smoke:train' or 'train.py'"
        )

    @classmethod
    def _resolve_script(cls, path: Path) -> EntryPoint:
        if not path.is_file():
            raise ValueError(f"entry point script {str(path)!r} does not exist (looked in {Path.cwd()})")
        if path.suffix != ".py":
            raise ValueError(f"entry point script {str(path)!r} is not a .py file")
        return cls("script", str(path.resolve()))

    @classmethod
    def _resolve_function(cls, text: str) -> EntryPoint:
        module_name, _, function_name = text.partition(":")
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError) as error:
            raise ValueError(f"entry point {text!r}: cannot find module {module_name!r} ({error})") from error
        if spec is None:
            raise ValueError(f"entry point {text!r}: no module named {module_name!r} on sys.path")
        module = importlib.import_module(module_name)
        function = getattr(module, function_name, None)
        if not callable(function):
            exported = set(getattr(module, "__all__", ()))  # a package's own names live in its submodules
            available = sorted(
                name
                for name, value in vars(module).items()
                if callable(value)
                and not name.startswith("_")
                and (getattr(value, "__module__", None) == module_name or name in exported)
            )
            raise ValueError(
                f"entry point {text!r}: module {module_name!r} has no callable {function_name!r}; "
                f"callables defined there: {available}"
            )
        return cls("module", text)

    def run(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """Call the entry point in this process and return what it returns (``None`` for a script)."""
        if self.kind == "callable":
            return self.target(*args, **kwargs)
        if self.kind == "module":
            module_name, _, function_name = str(self.target).partition(":")
            function = getattr(importlib.import_module(module_name), function_name)
            return function(*args, **kwargs)
        if kwargs:
            raise ValueError(f"entry point script {self.target!r} takes command-line arguments only, got {kwargs}")
        saved_argv = sys.argv
        sys.argv = [str(self.target), *(str(a) for a in args)]
        try:
            runpy.run_path(str(self.target), run_name="__main__")
        finally:
            sys.argv = saved_argv
        return None

    def describe(self) -> str:
        """The entry point as the user would write it."""
        if self.kind == "callable":
            module = inspect.getmodule(self.target)
            return f"{module.__name__ if module else '?'}:{self.name}"
        return str(self.target)
