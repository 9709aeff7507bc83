"""The checkpoint probing service: evaluate a training's checkpoints with the full probing protocol, off the loop.

- `distprobe eval CHECKPOINT --config eval.yaml` evaluates one checkpoint (`distprobe.service.job`).
- `distprobe watch RUN_DIR --config eval.yaml` submits one evaluation per new checkpoint (`distprobe.service.watch`).
- `distprobe results RUN_DIR` prints the results store as a table, JSON or CSV (`distprobe.report.results_table`).
- `distprobe retry RUN_DIR --failed` puts failed checkpoints back to pending.

docs/probing-service.md walks through them.
"""
