"""Feature taps: read a probe's features from any submodule's output, by a forward hook (torch only).

``"backbone.blocks.8"`` names a submodule; a suffix pools its tokens: ``":cls"``, ``":mean"``, ``":cls+mean"``,
``"backbone.blocks:last4"``, ``"backbone.blocks:last4+mean"`` (see docs/taps.md).
"""

from distprobe.features.pooling import cls_token, concat_features, first_tensor, patch_mean, pool_tokens
from distprobe.features.spec import TapSpec, is_tap_spec
from distprobe.features.taps import FeatureTap, TapError, TapNotCapturedError, TapSet

__all__ = [
    "FeatureTap",
    "TapError",
    "TapNotCapturedError",
    "TapSet",
    "TapSpec",
    "cls_token",
    "concat_features",
    "first_tensor",
    "is_tap_spec",
    "patch_mean",
    "pool_tokens",
]
