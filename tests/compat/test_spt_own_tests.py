"""stable-pretraining 0.1.8's own OnlineProbe tests, as its wheel ships them, run with distprobe's class put in.

The wheel ships its test suite (``stable_pretraining/tests``). These are the tests that build a real OnlineProbe; the
others that name it only construct a ``unittest.mock`` of it, or need a GPU, jax or downloads. Each runs twice, in
one pytest subprocess per implementation: ``[spt]`` untouched (shows the harness runs them as stable-pretraining
does) and ``[distprobe]`` through the `tests.compat.spt_substitute` plugin.
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("stable_pretraining")

import stable_pretraining  # noqa: E402

pytestmark = [pytest.mark.spt, pytest.mark.slow]

SPT_TESTS = os.path.join(os.path.dirname(stable_pretraining.__file__), "tests")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_GLOBAL_STEP = "unit/test_global_step_callback_optimizers.py::TestCallbackOptimizersDoNotAdvanceGlobalStep"
OWN_TESTS = [
    # [0] attaches no probe, and the fp16 variant needs a GPU: neither is listed.
    f"{_GLOBAL_STEP}::test_batches_match_global_step[1]",
    f"{_GLOBAL_STEP}::test_batches_match_global_step[3]",
    f"{_GLOBAL_STEP}::test_batches_match_global_step[5]",
    f"{_GLOBAL_STEP}::test_no_main_optimizer_still_ticks_global_step",
    "unit/test_probing.py::TestProbingUnit::test_online_probe_lifecycle_methods",
    # A user callback reads the probe's gradients in on_before_optimizer_step (OnlineImageDecoder, an OnlineProbe).
    "unit/test_image_decoder.py::TestGradientDetachment::test_encoder_gets_no_gradient_from_decoder",
]


def _junit_name(node_id):
    """(classname, name) under which junit XML reports ``node_id``."""
    path, *classes, name = node_id.split("::")
    return ".".join([path.removesuffix(".py").replace("/", "."), *classes]), name


@pytest.fixture(scope="module")
def own_results(tmp_path_factory):
    """Run `OWN_TESTS` once per implementation, on first use: ``{impl: {node_id: (outcome, message)}}``."""
    results = {}

    def run(impl):
        if impl not in results:
            results[impl] = _run_own_tests(impl, tmp_path_factory.mktemp(f"spt-own-{impl}"))
        return results[impl]

    return run


def _run_own_tests(impl, tmp):
    ini = tmp / "pytest.ini"
    ini.write_text("[pytest]\n")  # not distprobe's pyproject: its markers and --strict-markers are not theirs
    xml = tmp / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", SPT_TESTS, "-p", "no:cacheprovider"]
    cmd += ["--junitxml", str(xml)]
    if impl == "distprobe":
        cmd += ["-p", "tests.compat.spt_substitute"]
    cmd += [os.path.join(SPT_TESTS, node) for node in OWN_TESTS]
    env = {**os.environ, "LOGURU_LEVEL": "WARNING", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=str(tmp), env=env, capture_output=True, text=True, timeout=480)
    output = proc.stdout + proc.stderr
    if not xml.exists():
        return {node: ("no report", f"exit {proc.returncode}: {output[-1500:]}") for node in OWN_TESTS}
    if impl == "distprobe" and "OnlineProbe substituted: distprobe." not in output:
        return {node: ("not substituted", output[-1500:]) for node in OWN_TESTS}
    by_name = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, " ".join((child.get("message") or "").split())[:400]
        by_name[(case.get("classname"), case.get("name"))] = (outcome, message)
    return {node: by_name.get(_junit_name(node), ("not run", output[-1500:])) for node in OWN_TESTS}


@pytest.mark.parametrize("impl", ["spt", "distprobe"])
@pytest.mark.parametrize("node_id", OWN_TESTS, ids=[n.split("::")[-1] for n in OWN_TESTS])
def test_stable_pretraining_own_test(own_results, impl, node_id):
    outcome, message = own_results(impl)[node_id]
    assert outcome == "passed", f"{node_id} with {impl}'s OnlineProbe: {outcome}: {message}"
