"""A weighted online kNN classifier whose buffer is sharded over the data-parallel group (torch only)."""

from distprobe.knn.config import KNNConfig, KNNSpec, StorageDtype, to_knn_spec
from distprobe.knn.knn import ShardedKNN
from distprobe.knn.metrics import KNNAccuracy
from distprobe.knn.shard import RingShard

__all__ = ["KNNAccuracy", "KNNConfig", "KNNSpec", "RingShard", "ShardedKNN", "StorageDtype", "to_knn_spec"]
