"""distprobe: online probes that stay correct when training leaves one GPU.

The probe engine (`distprobe.engine`) is framework-agnostic; `distprobe.callbacks` adapts it to Lightning,
`distprobe.loop` to plain torch/torchrun scripts, and `distprobe.cluster` submits jobs to Slurm through submitit.
"""

__version__ = "0.1.0"
