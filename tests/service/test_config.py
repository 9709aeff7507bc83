"""A bad evaluation config fails when it is loaded, before anything runs, with an error naming the file, the key,
the value and what was expected; valid one-value forms load as the user meant them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.service.models import eval_config

from distprobe.service.config import EvalConfig, ServiceConfigError


def config_with(path: Path, key: str, value: Any) -> Path:
    """The tests' config with the dotted ``key`` set to ``value`` (sections created as needed)."""
    options = yaml.safe_load(eval_config(path).read_text())
    *parents, leaf = key.split(".")
    section = options
    for name in parents:
        section = section.setdefault(name, {})
    section[leaf] = copy.deepcopy(value)
    path.write_text(yaml.safe_dump(options))
    return path


def test_the_tests_config_loads_with_its_sections_typed(tmp_path):
    config = EvalConfig.load(eval_config(tmp_path / "eval.yaml"))
    assert config.num_classes == 4
    assert config.weights.prefix == "backbone."
    assert config.data.batch_size == 32
    assert config.probes.knn == {"k": [5, 20], "temperature": 0.1}
    assert config.source == str(tmp_path / "eval.yaml")


def test_the_fingerprint_changes_with_the_protocol_not_with_where_results_go(tmp_path):
    base = EvalConfig.load(eval_config(tmp_path / "a.yaml"))
    moved = EvalConfig.load(eval_config(tmp_path / "b.yaml", results={"store": str(tmp_path / "x.sqlite")}))
    other = EvalConfig.load(
        eval_config(tmp_path / "c.yaml", probes={"epochs": 4, "batch_size": 20, "bank": {"lr": [0.1]}})
    )
    assert base.fingerprint == moved.fingerprint
    assert base.fingerprint != other.fingerprint


def test_the_fingerprint_of_a_valid_config_is_the_one_results_stores_already_hold(tmp_path):
    """Stores key rows on the fingerprint: these are the values the code before the typed schema (3d24ad8) gave."""
    assert EvalConfig.load(eval_config(tmp_path / "a.yaml")).fingerprint == "2a7e4c4052120a84"
    varied = eval_config(
        tmp_path / "b.yaml",
        probes={"bank": {"lr": 0.1}, "knn": None, "seed": 3},
        features={"autocast": "none", "forward": "a.b:c"},
        weights={"prefix": "x", "strict": False, "safe_globals": ["argparse.Namespace"]},
        data={"train": {"_target_": "a"}, "val": {"_target_": "b"}, "input_key": "x", "label_key": 3},
    )
    assert EvalConfig.load(varied).fingerprint == "371512790a43709d"


# Every field of the config, with a value of the wrong type (or out of range), and the words its error must hold.
BAD_VALUES = [
    ("num_classes", "4", "num_classes='4'; expected an integer"),
    ("num_classes", 4.0, "num_classes=4.0; expected an integer"),
    ("num_classes", 1, "num_classes=1; expected an integer >= 2"),
    ("backbone", "tests.service.models.encoder", "backbone='tests.service.models.encoder'; expected a Hydra"),
    ("backbone", {"dim": 3}, "backbone={'dim': 3}; expected a Hydra config with '_target_'"),
    ("data", ["train"], "data=['train']; expected a mapping of its keys"),
    ("data.train", "train.csv", "data.train='train.csv'; expected a Hydra config"),
    ("data.val", None, "data.val=None; expected a Hydra config"),
    ("data.input_key", 1.5, "data.input_key=1.5; expected a string or an integer"),
    ("data.label_key", [1], "data.label_key=[1]; expected a string or an integer"),
    ("data.batch_size", "32", "data.batch_size='32'; expected an integer"),
    ("data.batch_size", 0, "data.batch_size=0; expected an integer >= 1"),
    ("data.num_workers", True, "data.num_workers=True; expected an integer"),
    ("data.num_workers", -1, "data.num_workers=-1; expected an integer >= 0"),
    ("data.shuffle", True, "unknown key(s) 'data.shuffle'; valid keys: ['train', 'val', 'input_key'"),
    ("weights", "backbone.", "weights='backbone.'; expected a mapping of its keys ['prefix', 'strict'"),
    ("weights.prefix", 123, "weights.prefix=123; expected a string"),
    ("weights.strict", "no", "weights.strict='no'; expected true or false"),
    ("weights.strict", 0, "weights.strict=0; expected true or false"),
    ("weights.format", "ckpt", "weights.format='ckpt'; expected one of ['auto', 'lightning', 'dcp', 'deepspeed']"),
    ("weights.safe_globals", [1], "weights.safe_globals=[1]; expected a string or a list of them"),
    ("weights.safe_globals", {"a": 1}, "weights.safe_globals={'a': 1}; expected a string or a list of them"),
    ("features", ["keep"], "features=['keep']; expected a mapping of its keys ['forward', 'autocast'"),
    ("features.forward", 3, "features.forward=3; expected null, 'module:function' or a Hydra config"),
    ("features.forward", "mypkg.forward", "features.forward='mypkg.forward'; expected null, 'module:function'"),
    ("features.autocast", "fp8", "features.autocast='fp8'; expected one of ['auto', 'bfloat16', 'float16', 'none']"),
    ("features.cache_dir", 5, "features.cache_dir=5; expected a string or null"),
    ("features.keep", "false", "features.keep='false'; expected true or false"),
    ("probes", 3, "probes=3; expected a mapping of its keys ['epochs', 'batch_size', 'seed', 'bank', 'knn', 'ridge'"),
    ("probes.epochs", "3", "probes.epochs='3'; expected an integer"),
    ("probes.epochs", 0, "probes.epochs=0; expected an integer >= 1"),
    ("probes.epoch", 3, "unknown key(s) 'probes.epoch' (did you mean 'probes.epochs'?)"),
    ("probes.batch_size", -20, "probes.batch_size=-20; expected an integer >= 1"),
    ("probes.seed", "zero", "probes.seed='zero'; expected an integer"),
    ("probes.seed", -1, "probes.seed=-1; expected an integer >= 0"),
    ("probes.bank", "SGD", "probes.bank='SGD'; expected a mapping or null"),
    ("probes.knn", [5], "probes.knn=[5]; expected a mapping or null"),
    ("probes.bank.name", 3, "probes.bank.name=3; expected a string"),
    # family is being added to BankConfig while this is written: the words hold whether it is there (a string
    # expected) or not yet (an unknown key).
    ("probes.bank.family", 3, "probes.bank.family"),
    ("probes.bank.head", "conv", "probes.bank.head='conv'; expected one of ['attentive', "),
    ("probes.bank.head_options", [2], "probes.bank.head_options=[2]; expected"),
    ("probes.bank.head_options", {"depth": 2}, "probes.bank: bank 'bank': argument 'head_options' got {'depth': 2}"),
    ("probes.bank.multilabel", True, "probes.bank.multilabel=True but probes.knn.multilabel=False; the cache keeps"),
    ("probes.bank.lr", "0.1", "probes.bank.lr='0.1'; expected a number or a list of them"),
    ("probes.bank.lr", [0.1, True], "probes.bank.lr=[0.1, True]; expected a number or a list of them"),
    ("probes.bank.lr", [-0.1], "probes.bank: bank 'bank': argument 'lr' got [-0.1]"),
    ("probes.bank.lrs", [0.1], "unknown key(s) 'probes.bank.lrs' (did you mean 'probes.bank.lr'?)"),
    ("probes.bank.weight_decay", [-1.0], "probes.bank: bank 'bank': argument 'weight_decay' got [-1.0]"),
    ("probes.bank.weight_decay", "none", "probes.bank.weight_decay='none'; expected a number or a list of them"),
    ("probes.bank.normalization", "layernorm", "probes.bank.normalization='layernorm'; expected one of"),
    ("probes.bank.optimizer", "Adam", "argument 'optimizer' names 'Adam'"),
    ("probes.bank.optimizer", {"type": "SGD", "momentum": "0.9"}, "probes.bank.optimizer.momentum='0.9'; expected a"),
    ("probes.bank.optimizer", {"type": "AdamW", "betas": [0.9]}, "probes.bank.optimizer.betas=[0.9]; expected a list"),
    ("probes.bank.optimizer", {"type": "SGD", "mom": 0.9}, "unknown key(s) 'probes.bank.optimizer.mom'"),
    ("probes.bank.scheduler", "Cosine", "probes.bank.scheduler='Cosine'"),
    ("probes.bank.scheduler", {"type": "StepLR", "steps": 3}, "unexpected keyword argument 'steps'"),
    ("probes.bank.accumulate_grad_batches", "2", "probes.bank.accumulate_grad_batches='2'; expected an integer"),
    ("probes.bank.accumulate_grad_batches", 0, "probes.bank: bank 'bank': argument 'accumulate_grad_batches' got 0"),
    ("probes.bank.gradient_clip_val", "1", "probes.bank.gradient_clip_val='1'; expected a number or null"),
    ("probes.bank.gradient_clip_val", 0.0, "probes.bank: bank 'bank': argument 'gradient_clip_val' got 0.0"),
    ("probes.bank.gradient_clip_algorithm", "l2", "probes.bank.gradient_clip_algorithm='l2'; expected one of"),
    ("probes.bank.metrics", ["acc"], "argument 'metrics' got 'acc'"),
    ("probes.bank.metrics", ["top5"], "probes.bank: bank 'bank': metric 'top5' asks for top-5"),
    ("probes.bank.selection_fraction", "0.2", "probes.bank.selection_fraction='0.2'; expected a number"),
    ("probes.bank.selection_fraction", 1.0, "probes.bank: bank 'bank': argument 'selection_fraction' got 1.0"),
    ("probes.bank.batchnorm_eps", "tiny", "probes.bank.batchnorm_eps='tiny'; expected a number"),
    ("probes.bank.batchnorm_momentum", True, "probes.bank.batchnorm_momentum=True; expected a number"),
    ("probes.bank.matmul_precision", "tf32", "probes.bank.matmul_precision='tf32'; expected one of"),
    ("probes.bank.num_classes", 4, "probes.bank.num_classes=4; the service sets it itself"),
    ("probes.bank.inputs", ["x"], "probes.bank.inputs=['x']; the service sets it itself"),
    ("probes.knn.name", 1, "probes.knn.name=1; expected a string"),
    ("probes.knn.k", "5", "probes.knn.k='5'; expected an integer or a list of them"),
    ("probes.knn.k", 0, "probes.knn: kNN 'knn': argument 'k' got (0,)"),
    ("probes.knn.k", [5, 5], "probes.knn: kNN 'knn': argument 'k' got [5, 5]"),
    ("probes.knn.temperature", "0.1", "probes.knn.temperature='0.1'; expected a number"),
    ("probes.knn.temperature", 0, "probes.knn: kNN 'knn': argument 'temperature' got 0"),
    ("probes.knn.storage_dtype", "int8", "probes.knn.storage_dtype='int8'; expected one of"),
    ("probes.knn.queue_length", 0, "probes.knn: kNN 'knn': argument 'queue_length' got 0"),
    ("probes.knn.queue_length", 10.5, "probes.knn.queue_length=10.5; expected an integer"),
    ("probes.knn.input", 3, "probes.knn.input=3; expected a string or null"),
    ("probes.knn.multilabel", True, "probes.bank.multilabel=False but probes.knn.multilabel=True; the cache keeps"),
    ("probes.knn.in_features", 16, "probes.knn.in_features=16; the service sets it itself"),
    ("probes.knn.neighbours", 5, "unknown key(s) 'probes.knn.neighbours'; valid keys: ['name', 'queue_length'"),
    ("probes.ridge", [0.1], "probes.ridge=[0.1]; expected a mapping or null"),
    ("probes.ridge.name", 3, "probes.ridge.name=3; expected a string"),
    ("probes.ridge.l2", "0.1", "probes.ridge.l2='0.1'; expected a number or a list of them"),
    ("probes.ridge.l2", [-1.0], "probes.ridge: ridge 'ridge': argument 'l2' got [-1.0]"),
    ("probes.ridge.selection_fraction", 1.5, "probes.ridge: ridge 'ridge': argument 'selection_fraction' got 1.5"),
    ("probes.ridge.num_classes", 4, "probes.ridge.num_classes=4; the service sets it itself"),
    ("probes.ridge.input", "x", "probes.ridge.input='x'; the service sets it itself"),
    ("probes.ridge.reset_statistics", "by_owner", "reset_statistics='by_owner'; the service sets it itself"),
    ("probes.ridge.lambdas", [1.0], "unknown key(s) 'probes.ridge.lambdas'; valid keys: ['name', 'l2'"),
    ("probes.logreg", "lbfgs", "probes.logreg='lbfgs'; expected a mapping or null"),
    ("probes.logreg.name", 1, "probes.logreg.name=1; expected a string"),
    ("probes.logreg.c_grid", [0.0, 1.0], "probes.logreg: logreg 'logreg': argument 'c_grid' got [0.0, 1.0]"),
    ("probes.logreg.c_grid", "1", "probes.logreg.c_grid='1'; expected a number or a list of them"),
    ("probes.logreg.holdout", 1.0, "probes.logreg: logreg 'logreg': argument 'holdout' got 1.0"),
    ("probes.logreg.chain", 0, "probes.logreg: logreg 'logreg': argument 'chain' got 0"),
    ("probes.logreg.max_iter", 2.5, "probes.logreg.max_iter=2.5; expected an integer"),
    ("probes.logreg.C", [1.0], "unknown key(s) 'probes.logreg.C'"),
    ("probes.fewshot", [5], "probes.fewshot=[5]; expected a mapping or null"),
    ("probes.fewshot.name", 2, "probes.fewshot.name=2; expected a string"),
    ("probes.fewshot.shots", [0, 5], "probes.fewshot: fewshot 'fewshot': argument 'shots' got [0, 5]"),
    ("probes.fewshot.seeds", 0, "probes.fewshot: fewshot 'fewshot': argument 'seeds' got 0"),
    ("probes.fewshot.solver", "svm", "probes.fewshot.solver='svm'; expected one of ['ridge', 'logreg']"),
    ("probes.fewshot.reg", [0.1, 1.0], "choosing the regularisation needs >= 2 shots per class"),
    ("probes.fewshot.reg", "big", "probes.fewshot.reg='big'; expected a number"),
    ("probes.intervals", 1000, "probes.intervals=1000; expected a mapping of its keys ['resamples', 'level', 'seed']"),
    ("probes.intervals.resamples", -1, "probes.intervals.resamples=-1; expected an integer >= 0"),
    ("probes.intervals.level", 1.5, "probes.intervals.level=1.5; expected a coverage in (0, 1)"),
    ("probes.intervals.seed", "0", "probes.intervals.seed='0'; expected an integer"),
    ("results", "out.sqlite", "results='out.sqlite'; expected a mapping of its keys"),
    ("results.store", 1, "results.store=1; expected a string or null"),
    ("results.logger", "wandb", "results.logger='wandb'; expected one of ['auto', 'tensorboard', 'csv', 'none']"),
    ("results.log_dir", [], "results.log_dir=[]; expected a string or null"),
    ("probe", {}, "unknown key(s) 'probe' (did you mean 'probes'?)"),
    ("source", "other.yaml", "unknown key(s) 'source'; valid keys: ['num_classes', 'backbone', 'data'"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_a_bad_value_names_the_file_the_key_the_value_and_what_was_expected(tmp_path, key, value, message):
    path = config_with(tmp_path / "eval.yaml", key, value)
    with pytest.raises(ServiceConfigError) as err:
        EvalConfig.load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_every_field_of_the_schema_has_a_bad_value_case():
    """A field added to a section, the bank or the kNN needs a row in BAD_VALUES (fields derived, not listed)."""
    import dataclasses

    from distprobe.bank.config import BankConfig
    from distprobe.knn.config import KNNConfig
    from distprobe.service.config import SECTIONS
    from distprobe.service.config_probes import BANK_SET_BY_SERVICE, KNN_SET_BY_SERVICE
    from distprobe.service.config_schema import valid_keys

    fields = {"num_classes", "backbone"} | {
        f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
    }
    fields |= set(SECTIONS)
    fields |= {f"probes.bank.{k}" for k in valid_keys(BankConfig, exclude=BANK_SET_BY_SERVICE)}
    fields |= {f"probes.knn.{k}" for k in valid_keys(KNNConfig, exclude=KNN_SET_BY_SERVICE)}
    from distprobe.convex import RidgeConfig
    from distprobe.service.config import IntervalsConfig
    from distprobe.service.config_convex import RIDGE_SET_BY_SERVICE, FewshotOptions, LogregOptions

    fields |= {f"probes.ridge.{k}" for k in valid_keys(RidgeConfig, exclude=RIDGE_SET_BY_SERVICE)}
    fields |= {f"probes.logreg.{k}" for k in valid_keys(LogregOptions)}
    fields |= {f"probes.fewshot.{k}" for k in valid_keys(FewshotOptions)}
    fields |= {f"probes.intervals.{k}" for k in valid_keys(IntervalsConfig)}
    covered = {key for key, _, _ in BAD_VALUES}
    assert sorted(fields - covered) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"probes": {"bank": None, "knn": None}},
            "probes has no probe; give at least one of ['bank', 'knn', 'ridge', 'logreg', 'fewshot']",
        ),
        ({"data": {"train": {"_target_": "x"}}}, "the required key 'data.val' is missing"),
        ({"data": None}, "the required key 'data' is empty"),
    ],
)
def test_missing_parts_are_named(tmp_path, override, message):
    path = eval_config(tmp_path / "eval.yaml", **override)
    with pytest.raises(ServiceConfigError) as err:
        EvalConfig.load(path)
    assert str(err.value) == f"{path}: {message}"


def test_a_missing_required_key_is_named(tmp_path):
    path = tmp_path / "eval.yaml"
    options = yaml.safe_load(eval_config(path).read_text())
    del options["num_classes"]
    path.write_text(yaml.safe_dump(options))
    with pytest.raises(ServiceConfigError, match="the required key 'num_classes' is missing"):
        EvalConfig.load(path)


# Valid values at their edges, and one value where a list is usual: loaded as the user meant them.
GOOD_VALUES = [
    ("num_classes", 2, lambda c: c.num_classes == 2),
    ("weights.strict", False, lambda c: c.weights.strict is False),
    ("features.keep", True, lambda c: c.features.keep is True),
    ("weights.safe_globals", "argparse.Namespace", lambda c: c.weights.safe_globals == ["argparse.Namespace"]),
    ("weights.safe_globals", ["argparse.Namespace"], lambda c: c.weights.safe_globals == ["argparse.Namespace"]),
    ("weights.prefix", "", lambda c: c.weights.prefix == ""),
    ("weights", None, lambda c: c.weights.prefix == "" and c.weights.strict is True),
    ("data.input_key", "x", lambda c: c.data.input_key == "x"),
    ("data.label_key", 0, lambda c: c.data.label_key == 0),
    ("data.batch_size", 1, lambda c: c.data.batch_size == 1),
    ("data.num_workers", 0, lambda c: c.data.num_workers == 0),
    ("features.forward", "tests.service.models:encoder", lambda c: c.features.forward.endswith(":encoder")),
    ("features.forward", {"_target_": "tests.service.models.encoder"}, lambda c: "_target_" in c.features.forward),
    ("features.cache_dir", "/scratch/cache", lambda c: c.features.cache_dir == "/scratch/cache"),
    ("probes.epochs", 1, lambda c: c.probes.epochs == 1),
    ("probes.seed", 0, lambda c: c.probes.seed == 0),
    ("probes.knn", None, lambda c: c.probes.knn is None),
    ("probes.bank", None, lambda c: c.probes.bank is None),
    ("probes.bank.lr", 0.1, lambda c: c.probes.bank["lr"] == 0.1),
    ("probes.bank.lr", [0.1], lambda c: c.probes.bank["lr"] == [0.1]),
    ("probes.bank.lr", 1, lambda c: c.probes.bank["lr"] == 1),
    ("probes.bank.weight_decay", 0.0, lambda c: c.probes.bank["weight_decay"] == 0.0),
    ("probes.bank.normalization", "batchnorm", lambda c: c.probes.bank["normalization"] == "batchnorm"),
    ("probes.bank.normalization", [None, "batchnorm"], lambda c: c.probes.bank["normalization"][1] == "batchnorm"),
    ("probes.bank.optimizer", {"type": "AdamW", "betas": [0.9, 0.95]}, lambda c: c.probes.bank["optimizer"]),
    ("probes.bank.scheduler", "CosineAnnealingLR", lambda c: c.probes.bank["scheduler"] == "CosineAnnealingLR"),
    ("probes.bank.gradient_clip_val", None, lambda c: c.probes.bank["gradient_clip_val"] is None),
    ("probes.bank.metrics", ["top1", "top4"], lambda c: c.probes.bank["metrics"] == ["top1", "top4"]),
    ("probes.knn.k", 5, lambda c: c.probes.knn["k"] == 5),
    ("probes.knn.k", [5], lambda c: c.probes.knn["k"] == [5]),
    ("probes.knn.k", 1, lambda c: c.probes.knn["k"] == 1),
    ("probes.knn.temperature", 1, lambda c: c.probes.knn["temperature"] == 1),
    ("probes.knn.storage_dtype", "bfloat16", lambda c: c.probes.knn["storage_dtype"] == "bfloat16"),
    ("results.logger", "none", lambda c: c.results.logger == "none"),
    ("probes.ridge", {"l2": 0.1}, lambda c: c.probes.ridge == {"l2": 0.1}),
    ("probes.logreg", {}, lambda c: c.probes.logreg == {}),
    ("probes.fewshot", {"shots": [2, 5], "reg": [0.1, 1.0]}, lambda c: c.probes.fewshot["shots"] == [2, 5]),
    ("probes.intervals.resamples", 0, lambda c: c.probes.intervals.resamples == 0),
]


@pytest.mark.parametrize(("key", "value", "check"), GOOD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in GOOD_VALUES])
def test_valid_edge_values_and_single_values_load_as_meant(tmp_path, key, value, check):
    assert check(EvalConfig.load(config_with(tmp_path / "eval.yaml", key, value)))


def test_interpolations_are_resolved_before_the_types_are_checked(tmp_path):
    path = tmp_path / "eval.yaml"
    options = yaml.safe_load(eval_config(path).read_text())
    options["batch"] = 16  # an unknown top-level key, so it is refused even when only interpolated
    options["data"]["batch_size"] = "${batch}"
    path.write_text(yaml.safe_dump(options))
    with pytest.raises(ServiceConfigError, match="unknown key"):
        EvalConfig.load(path)
    options["probes"]["batch_size"] = options.pop("batch")
    options["data"]["batch_size"] = "${probes.batch_size}"
    path.write_text(yaml.safe_dump(options))
    assert EvalConfig.load(path).data.batch_size == 16


def test_from_dict_checks_like_load(tmp_path):
    options = yaml.safe_load(eval_config(tmp_path / "eval.yaml").read_text())
    options["weights"]["strict"] = "no"
    with pytest.raises(ServiceConfigError, match=r"^benchmark: weights.strict='no'; expected true or false$"):
        EvalConfig.from_dict(options, source="benchmark")


def test_a_missing_file_and_broken_yaml_are_errors_naming_the_file(tmp_path):
    with pytest.raises(ServiceConfigError, match="no such config file"):
        EvalConfig.load(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("num_classes: [1, 2\n")
    with pytest.raises(ServiceConfigError, match="not a valid YAML config") as err:
        EvalConfig.load(broken)
    assert str(broken) in str(err.value)
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ServiceConfigError, match="expected a mapping at the top level"):
        EvalConfig.load(listed)


def test_eval_and_watch_refuse_a_bad_config_before_submitting_anything(tmp_path, capsys):
    """`distprobe eval` and `distprobe watch` load the config first: exit 2 with the error, no job folder made."""
    from distprobe.cli import main

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    checkpoint = run_dir / "checkpoints" / "step=10.ckpt"
    checkpoint.write_bytes(b"not read: the config fails first")
    config = config_with(tmp_path / "eval.yaml", "weights.strict", "no")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    assert (
        main(["eval", str(checkpoint), "--config", str(config), "--cluster", "debug", "--run-dir", str(run_dir)]) == 2
    )
    assert f"{config}: weights.strict='no'; expected true or false" in capsys.readouterr().err
    assert main(["watch", str(run_dir), "--config", str(config), "--cluster", "debug", "--max-polls", "1"]) == 2
    assert f"{config}: weights.strict='no'; expected true or false" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
