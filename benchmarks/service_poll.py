"""The watcher's poll over many known checkpoints (issue 24's scale target: 10,000 in at most 0.5 s).

    python benchmarks/service_poll.py --checkpoints 10000 --rounds 3

Prints the minimum and every round's time of one `Watcher.poll()` that finds nothing new, with every checkpoint
already in the store as done (the steady state of a long training's watcher).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from distprobe.cluster import ClusterConfig
from distprobe.service.config import EvalConfig
from distprobe.service.watch import WatchConfig, Watcher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.service.models import eval_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "run" / "checkpoints"
        folder.mkdir(parents=True)
        paths = [folder / f"epoch=0-step={step}.ckpt" for step in range(args.checkpoints)]
        for path in paths:
            path.touch()
        config = eval_config(root / "eval.yaml", results={"logger": "none"})
        watcher = Watcher(
            WatchConfig(run_dir=root / "run", config_path=config, cluster=ClusterConfig(cluster="local"), every=2)
        )
        watcher.store.add(EvalConfig.load(config).fingerprint, [(str(p), s, "done", None) for s, p in enumerate(paths)])
        timings = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            watcher.poll()
            timings.append(time.perf_counter() - start)
    print(f"poll over {args.checkpoints:,} known checkpoints: {min(timings):.3f} s (min of {args.rounds}; {timings})")


if __name__ == "__main__":
    main()
