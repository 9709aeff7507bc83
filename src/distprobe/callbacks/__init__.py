"""Lightning adapters over the probe engine."""

from distprobe.callbacks.bank import OnlineProbeBank
from distprobe.callbacks.knn import OnlineKNN
from distprobe.callbacks.monitors import EmbeddingMonitor
from distprobe.callbacks.online_probe import OnlineProbe
from distprobe.callbacks.ridge import OnlineRidge
from distprobe.callbacks.trainable import NotSetUpError, TrainableCallback

__all__ = [
    "EmbeddingMonitor",
    "NotSetUpError",
    "OnlineKNN",
    "OnlineProbe",
    "OnlineProbeBank",
    "OnlineRidge",
    "TrainableCallback",
]
