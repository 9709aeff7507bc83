"""The demo: SimCLR on scikit-learn's 8x8 digits with live online probes, on CPU in about a minute.

``distprobe demo`` and ``make demo`` run it; ``distprobe submit ... distprobe.demo:train`` runs the same training as
a Slurm (or local) job. Its parts:

- `distprobe.demo.training`: the main job (the data, the probes, the Trainer, `run_demo` and the launcher's `train`);
- `distprobe.demo.model`: the self-supervised model (augmentations, a small convnet, SimCLR's InfoNCE);
- `distprobe.demo.eval`: the offline evaluation of frozen features beside random initialisations and raw pixels;
- `distprobe.demo.output`: the terminal output (one row per epoch, the final summary).
"""

from distprobe.demo.training import (
    NUM_CLASSES,
    DemoConfig,
    DemoTraining,
    Digits,
    DigitsData,
    ResumableSampler,
    build_training,
    default_out_dir,
    embed,
    eval_splits,
    final_comparison,
    intra_op_threads,
    labeled_subset,
    make_probes,
    random_backbone,
    run_demo,
    train,
    write_demo_report,
)

__all__ = [
    "NUM_CLASSES",
    "DemoConfig",
    "DemoTraining",
    "Digits",
    "DigitsData",
    "ResumableSampler",
    "build_training",
    "default_out_dir",
    "embed",
    "eval_splits",
    "final_comparison",
    "intra_op_threads",
    "labeled_subset",
    "make_probes",
    "random_backbone",
    "run_demo",
    "train",
    "write_demo_report",
]
