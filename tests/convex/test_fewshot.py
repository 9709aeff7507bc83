import pytest
import torch

from distprobe.convex import draw_episode, draw_episodes, run_fewshot, summarise

from .helpers import gaussian_classes


def test_episode_depends_on_seed_shots_and_class_alone():
    _, y, _, _ = gaussian_classes(200, 1, num_classes=4)
    episode = draw_episode(y, 4, 5, seed=1)
    assert episode.id == "shots=5/seed=1"
    assert episode.indices.unique().numel() == 20
    assert torch.equal(y[episode.indices], torch.arange(4).repeat_interleave(5))
    # The same draw whatever else is drawn, and in whatever order.
    together = draw_episodes(y, 4, shots=[10, 5, 1], seeds=[3, 1])
    assert torch.equal(next(e for e in together if e.id == episode.id).indices, episode.indices)
    assert not torch.equal(draw_episode(y, 4, 5, seed=2).indices, episode.indices)
    # A class's draw does not move when another class gains samples.
    grown = torch.cat([y, torch.full((30,), 3)])
    assert torch.equal(draw_episode(grown, 4, 5, seed=1).indices[:15], episode.indices[:15])


@pytest.mark.parametrize(("solver", "grid"), [("ridge", [1e-3, 1e-1, 10.0]), ("logreg", [1e-2, 1.0, 100.0])])
def test_poisoned_validation_labels_change_no_regularisation_choice(solver, grid):
    x, y, vx, vy = gaussian_classes(150, 90)
    run = {"shots": [2, 4], "seeds": 1, "solver": solver, "reg": grid}
    clean = run_fewshot(x, y, vx, vy, 3, **run)
    poisoned = run_fewshot(x, y, vx, (vy + 1) % 3, 3, **run)
    assert [r.reg for r in clean] == [r.reg for r in poisoned]
    assert {r.reg for r in clean} <= set(grid)
    assert [r.top1 for r in clean] != [r.top1 for r in poisoned]


def test_skip_redoes_only_the_missing_episodes_with_the_same_results():
    x, y, vx, vy = gaussian_classes(120, 40)
    run = {"shots": [1, 4], "seeds": 2, "solver": "ridge", "reg": 1.0}
    full = run_fewshot(x, y, vx, vy, 3, **run)
    rest = run_fewshot(x, y, vx, vy, 3, skip=["shots=1/seed=0", "shots=4/seed=1"], **run)
    assert [r.id for r in rest] == ["shots=1/seed=1", "shots=4/seed=0"]
    by_id = {r.id: r for r in full}
    for r in rest:
        assert torch.equal(r.val_correct, by_id[r.id].val_correct)


def test_summary_is_mean_and_std_over_seeds():
    x, y, vx, vy = gaussian_classes(120, 40)
    results = run_fewshot(x, y, vx, vy, 3, shots=[3], seeds=3, solver="ridge", reg=0.1)
    (summary,) = summarise(results)
    top1 = torch.tensor([r.top1 for r in results], dtype=torch.float64)
    assert (summary.shots, summary.seeds) == (3, 3)
    assert summary.mean == pytest.approx(float(top1.mean()))
    assert summary.std == pytest.approx(float(top1.std()))


def test_bad_arguments_are_refused():
    x, y, vx, vy = gaussian_classes(60, 10)
    with pytest.raises(
        ValueError, match=r"shots=\[1\] with reg=\[0.1, 1.0\]: choosing the regularisation needs >= 2 shots"
    ):
        run_fewshot(x, y, vx, vy, 3, shots=[1], seeds=1, solver="ridge", reg=[0.1, 1.0])
    with pytest.raises(ValueError, match="solver='svm'; expected one of"):
        run_fewshot(x, y, vx, vy, 3, shots=[1], seeds=1, solver="svm", reg=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class 0 has .* fewer than shots=100"):
        draw_episode(y, 3, 100, seed=0)
