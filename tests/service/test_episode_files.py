"""A few-shot episode file in a job's folder that is not a whole episode is solved again, never a crash of the job.

`read_episodes` checked the file's format, id and bits, but read ``shots``, ``seed`` and ``reg`` outside its guard:
``"reg": null`` raised TypeError and ``"shots": "x"`` ValueError in the requeued job.
"""

from __future__ import annotations

import json

import pytest
import torch

from distprobe.convex import EpisodeResult
from distprobe.service.train_convex import episode_file, read_episodes, write_episode


@pytest.mark.parametrize(
    "change", [{"reg": None}, {"shots": "x"}, {"seed": [0]}, {"correct": [1, 0, 1]}, {"correct": None}]
)
def test_a_damaged_episode_file_is_left_to_be_solved_again(tmp_path, change):
    whole = EpisodeResult("shots=1/seed=0", 1, 0, 0.01, torch.tensor([True, False, True]))
    path = write_episode(tmp_path, "fewshot", whole)
    assert path == episode_file(tmp_path, "fewshot", "shots=1/seed=0")
    (back,) = read_episodes(tmp_path, "fewshot", ["shots=1/seed=0"], 3).values()
    assert torch.equal(back.val_correct, whole.val_correct) and (back.shots, back.seed, back.reg) == (1, 0, 0.01)
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    assert read_episodes(tmp_path, "fewshot", ["shots=1/seed=0"], 3) == {}
