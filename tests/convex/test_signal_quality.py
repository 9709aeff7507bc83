"""Issue 27's signal-quality study (`signal_quality.run`), one seed per test: about 40 s each on a 2-core CPU.

Measured (2026-12-06, CPU; report split 6,399 samples, one point = 64 samples), online minus offline logistic
regression, in points, at seeds 0 / 1 / 2:

- the bank's best head: -0.67 / -0.56 / -0.91 (issue 27's target, within 1 point, is met and asserted). With the
  former lr grid 1e-3..3e-2 it was -1.66 / -1.33 / -2.23: the head selected on the selection split sat on the grid's
  upper edge at every seed. Of what is left, about 0.5 point is lag: the same bank trained for the same 25 epochs on
  the frozen final features scores -0.05 / -0.11 / -0.40;
- the online ridge: -4.91 / -5.03 / -4.24, and NOT within 1 point. That gap is the model's, not the online
  statistics': a ridge fitted offline on every training sample's final features scores within 0.06 point of the
  online one at each seed, and no lambda from 1e-8 to 100, raw or standardised features, comes within 4 points of
  the logistic regression (least squares on one-hot labels against a multinomial likelihood, on 10 classes of 3
  clusters each). So it is stated, not asserted: what is asserted is that the online ridge equals that offline
  ridge to half a point. `benchmarks/ridge_gap.py` finds the gap with a 512-d embedding too (2.97-3.31 points) and
  on a set of shape images (more than 7 points): docs/convex.md, "Signal quality".

The numbers are printed (run with ``-s``); docs/convex.md has the table.
"""

import pytest
from tests.convex.signal_quality import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_numbers_against_the_offline_logistic_regression(seed):
    r = run(seed)
    print(
        f"seed {seed} ({r['reported']} reported samples): offline logreg {r['offline']:.4f} (C={r['offline_c']:g}); "
        f"bank {r['bank']:.4f} ({100 * (r['bank'] - r['offline']):+.2f} pt); online ridge {r['ridge']:.4f} "
        f"({100 * (r['ridge'] - r['offline']):+.2f} pt, l2={r['ridge_l2']:g}); offline ridge {r['offline_ridge']:.4f}"
    )
    assert r["reported"] >= 5000  # one point is at least 50 reported samples
    assert abs(r["bank"] - r["offline"]) <= 0.01  # issue 27's target
    assert abs(r["ridge"] - r["offline_ridge"]) <= 0.005
