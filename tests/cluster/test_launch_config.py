"""Bad parameters fail before anything is submitted, with errors that name the value and list the valid options."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from distprobe.cluster import ClusterConfig, submit
from distprobe.cluster.cli import add_submit_arguments, function_arguments, run_submit
from distprobe.cluster.entry import EntryPoint


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_submit_arguments(parser)
    return parser.parse_args(argv)


def test_more_tasks_than_gpus_is_refused():
    with pytest.raises(ValueError, match=r"tasks_per_node=4 is more than gpus_per_node=2"):
        ClusterConfig(tasks_per_node=4, gpus_per_node=2)
    assert ClusterConfig(tasks_per_node=2, gpus_per_node=2).world_size == 2
    assert ClusterConfig(tasks_per_node=4, gpus_per_node=0).world_size == 4  # a CPU job


def test_unknown_key_lists_the_fields_of_the_dataclass():
    with pytest.raises(ValueError) as error:
        ClusterConfig.from_dict({"nodes": 2, "gpus_per_nod": 8, "colour": "red"})
    message = str(error.value)
    assert "'gpus_per_nod' (did you mean 'gpus_per_node'?)" in message
    assert "'colour'" in message
    # The list is derived from the dataclass, not kept by hand.
    assert str([f.name for f in dataclasses.fields(ClusterConfig)]) in message


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"cluster": "kubernetes"}, "expected one of ('slurm', 'local', 'debug')"),
        ({"nodes": 0}, "ClusterConfig: argument 'nodes' got 0; expected an int >= 1"),
        ({"partition": "gpu\nrm -rf /"}, "contains a newline"),
        ({"srun_args": ["--x\r"]}, "contains a carriage return"),
        ({"sbatch_options": {"partition": "gpu"}}, "ClusterConfig.partition controls"),
        ({"sbatch_options": {"--account": "ml"}}, "without dashes"),
        ({"cluster": "local", "nodes": 2}, "runs on one machine"),
        ({"cluster": "debug", "tasks_per_node": 2}, "cluster='local' for several tasks"),
        ({"time_min": 1, "signal_delay_s": 60}, "signal_delay_s=60 is not shorter than time_min=1"),
        ({"mem_gb": -1}, "mem_gb=-1"),
        ({"mem_gb": float("inf")}, "mem_gb=inf"),
        ({"mem_gb": float("nan")}, "mem_gb=nan"),
    ],
)
def test_bad_values_name_the_field(options, fragment):
    with pytest.raises(ValueError, match="ClusterConfig") as error:
        ClusterConfig.from_dict(options)
    assert fragment in str(error.value)


def test_bad_entry_points_fail_before_anything_is_submitted(tmp_path):
    folder = tmp_path / "jobs"
    config = ClusterConfig(cluster="local", folder=str(folder / "%j"))
    with pytest.raises(ValueError, match=r"script '.*missing\.py' does not exist"):
        submit(str(tmp_path / "missing.py"), config)
    with pytest.raises(ValueError, match=r"no module named 'no_such_module_xyz'"):
        submit("no_such_module_xyz:main", config)
    with pytest.raises(ValueError, match=r"has no callable 'trian'; callables defined there: \['environment', 'main'"):
        submit("distprobe.cluster.smoke:trian", config)
    with pytest.raises(ValueError, match="neither 'module:function' nor the path"):
        submit("train", config)
    with pytest.raises(ValueError, match="expected a ClusterConfig"):
        submit("distprobe.cluster.smoke:train", {"cluster": "local"})  # type: ignore[arg-type]
    # submitit creates the job folder when an executor is made: its absence proves nothing was submitted.
    assert not folder.exists()


def test_entry_point_kinds(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    assert EntryPoint.resolve(str(script)).kind == "script"
    assert EntryPoint.resolve("distprobe.cluster.smoke:train").kind == "module"
    assert EntryPoint.resolve(print).kind == "callable"


def test_cli_options_are_the_dataclass_fields():
    namespace = _parse(["distprobe.cluster.smoke:train"])
    dests = {name.removeprefix("submit_") for name in vars(namespace) if name.startswith("submit_")}
    assert {f.name for f in dataclasses.fields(ClusterConfig)} <= dests


def test_cli_builds_the_config():
    from distprobe.cluster.cli import config_from_args

    args = _parse(
        [
            "--nodes=2",
            "--tasks-per-node=8",
            "--gpus-per-node=8",
            "--partition=gpu",
            "--mem-gb=64",
            "--sbatch-option",
            "account=ml",
            "--sbatch-option",
            "exclusive",
            "--srun-arg=--cpu-bind=none",
            "train.py",
            "--lr",
            "0.1",
        ]
    )
    config = config_from_args(args)
    assert (config.nodes, config.tasks_per_node, config.gpus_per_node, config.mem_gb) == (2, 8, 8, 64.0)
    assert config.sbatch_options == {"account": "ml", "exclusive": True}
    assert config.srun_args == ["--cpu-bind=none"]
    assert args.entry_args == ["--lr", "0.1"]


def test_cli_reports_bad_parameters_without_submitting(tmp_path, capsys):
    folder = tmp_path / "jobs"
    status = run_submit(
        _parse(
            [
                "--cluster=local",
                f"--folder={folder}/%j",
                "--tasks-per-node=3",
                "--gpus-per-node=2",
                "distprobe.cluster.smoke:train",
            ]
        )
    )
    assert status == 2
    assert "distprobe submit: error: ClusterConfig.tasks_per_node=3 is more than gpus_per_node=2" in (
        capsys.readouterr().err
    )
    assert not folder.exists()


def test_function_arguments():
    assert function_arguments(["3", "steps=40", "name=run-1", "rate=0.5"]) == (
        [3],
        {"steps": 40, "name": "run-1", "rate": 0.5},
    )
    with pytest.raises(ValueError, match="cannot follow keyword"):
        function_arguments(["steps=4", "3"])
