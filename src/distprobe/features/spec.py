"""`TapSpec`: which submodule's output a probe reads, and how its tokens are pooled (torch only)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from distprobe.features.names import find_module
from distprobe.features.pooling import TokenPool

TOKEN_POOLS: tuple[TokenPool, ...] = ("cls", "mean", "cls+mean", "patch")
_LAST = re.compile(r"(patch\+)?last(\d+)(\+mean)?")
_OPTIONS = ("prefix",)
_EXPECTED = (
    "expected 'path.to.module' (its output as is), 'path.to.module:tokens' (the same, said aloud: (B, N, D) tokens "
    "unpooled, for attentive heads) or 'path.to.module:POOL[,prefix=K]' with POOL one of "
    "'cls', 'mean', 'cls+mean', 'patch', 'last{n}', 'last{n}+mean', 'patch+last{n}' (e.g. 'backbone.blocks.8:cls', "
    "'backbone.blocks:last4', 'backbone.blocks:patch+last4')"
)


def _prefix_tokens(options: list[str], bad: Callable[[str], ValueError]) -> int:
    """The ``prefix=K`` option (1 without it)."""
    prefix_tokens = 1
    for option in options:
        key, equals, value = option.partition("=")
        if key not in _OPTIONS or not equals:
            raise bad(f"unknown option {option!r}; valid options: {list(_OPTIONS)} as 'key=value'")
        if not value.isdigit() or int(value) < 1:
            raise bad(f"'prefix' must be a whole number >= 1 (the CLS token plus any registers), got {value!r}")
        prefix_tokens = int(value)
    return prefix_tokens


def _owner(probe_name: str | None) -> str:
    return f"probe '{probe_name}'" if probe_name else "feature tap"


@dataclass(frozen=True)
class TapSpec:
    """A parsed tap: ``"backbone.blocks.8"``, ``"backbone.blocks.11:cls+mean"``, ``"backbone.blocks:last4+mean"``.

    Example:
        >>> spec = TapSpec.parse("backbone.blocks:last4+mean,prefix=5")
        >>> spec.module_path, spec.pool, spec.last_blocks, spec.with_mean, spec.prefix_tokens
        ('backbone.blocks', 'last4+mean', 4, True, 5)
    """

    text: str
    """The spec as written; keys `TapSet.take`."""
    module_path: str
    """Dotted name of the submodule (for ``last{n}``: of the container whose last n children are read)."""
    pool: str | None = None
    """None (the output as is; a tuple's first element), ``cls``, ``mean``, ``cls+mean``, ``last{n}``,
    ``last{n}+mean``."""
    last_blocks: int | None = None
    """n of ``last{n}``: the CLS tokens of the container's last n children, concatenated (dim n*D)."""
    with_mean: bool = False
    """``last{n}+mean``: the last child's mean patch token is appended (dim (n+1)*D), DINOv2's ``avgpool``."""
    prefix_tokens: int = 1
    """Leading tokens that are not patches (CLS plus registers): ``mean`` averages tokens ``prefix_tokens:``."""
    patches: bool = False
    """``patch+last{n}``: the patch tokens of the last n children, concatenated on D (``(B, N - prefix, n*D)``,
    DINOv2's multi-layer input of its linear segmentation head)."""

    @property
    def token_pool(self) -> TokenPool | None:
        """The pool applied to one module's output (``cls`` for each child under ``last{n}``)."""
        if self.last_blocks is not None:
            return "patch" if self.patches else "cls"
        return self.pool  # type: ignore[return-value]  # one of TOKEN_POOLS or None, checked in parse

    @classmethod
    def parse(cls, spec: str, *, probe_name: str | None = None, argument: str = "input") -> TapSpec:
        """Parse ``"module.path[:POOL[,prefix=K]]"``.

        Raises:
            ValueError: naming the probe, the argument, the value, what was expected and the fix.
        """

        def bad(why: str) -> ValueError:
            return ValueError(f"{_owner(probe_name)}: argument '{argument}' got {spec!r}: {why}; {_EXPECTED}.")

        if not isinstance(spec, str):
            raise bad(f"a {type(spec).__name__}, not a string")
        path, colon, suffix = spec.partition(":")
        if not path or any(not part or part != part.strip() for part in path.split(".")):
            raise bad("the module path has an empty or blank segment")
        if not colon:
            return cls(text=spec, module_path=path)
        pool, *options = (part.strip() for part in suffix.split(","))
        if pool == "tokens" and not options:
            return cls(text=spec, module_path=path)
        prefix_tokens = _prefix_tokens(options, bad)
        if pool in TOKEN_POOLS:
            return cls(text=spec, module_path=path, pool=pool, prefix_tokens=prefix_tokens)
        match = _LAST.fullmatch(pool)
        if match is None:
            raise bad("':tokens' takes no options" if pool == "tokens" else f"unknown pooling {pool!r}")
        last_blocks = int(match.group(2))
        if last_blocks < 1:
            raise bad("'last{n}' needs n >= 1")
        if match.group(1) and match.group(3):
            raise bad("'patch+last{n}' takes no '+mean': the patch tokens are kept, not pooled")
        return cls(
            text=spec,
            module_path=path,
            pool=pool,
            last_blocks=last_blocks,
            with_mean=match.group(3) is not None,
            prefix_tokens=prefix_tokens,
            patches=match.group(1) is not None,
        )


def is_tap_spec(spec: str, root: nn.Module) -> bool:
    """Whether the module-path part of ``spec`` (before any ``:``) names a submodule of ``root``.

    Wrapper segments (FSDP1, activation checkpointing, torch.compile, DDP) are ignored; the pooling suffix is not
    checked here (`TapSpec.parse` checks it, with an error that says what is wrong).
    """
    if not isinstance(spec, str):
        return False
    path = spec.partition(":")[0]
    return bool(path) and find_module(root, path) is not None
