"""DeepSpeed on real gloo processes: 2 ranks == 1 rank on the same global batch; ZeRO-3 shards the table."""

from __future__ import annotations

import pytest
import torch

from tests.dist import workers
from tests.dist.harness import launch
from tests.fixtures import write_tiny_dataset

pytestmark = pytest.mark.dist

STAGES = [0, 2, 3]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 1-rank and one 2-rank launch, each training every ZeRO stage in turn."""
    root = tmp_path_factory.mktemp("dist-engine")
    write_tiny_dataset(root / "data", num_users=48, num_items=30, max_len=8)
    data = str(root / "data")
    one = launch(workers.equivalence_all_stages, 1, data, str(root / "one"), STAGES, 4, 3)[0]
    two = launch(workers.equivalence_all_stages, 2, data, str(root / "two"), STAGES, 4, 3)
    return one, two


@pytest.mark.parametrize("zero_stage", STAGES)
def test_two_ranks_match_one_rank(runs, zero_stage):
    one, two = runs[0][zero_stage], {r: runs[1][r][zero_stage] for r in (0, 1)}
    for rank in (0, 1):
        assert two[rank]["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
        assert two[rank]["params"].keys() == one["params"].keys()
        for name, value in one["params"].items():
            torch.testing.assert_close(two[rank]["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # the weights really moved, so the equality above is not trivially true
    moved = sum(float((one["params"][n] - one["initial"][n]).abs().sum()) for n in one["initial"])
    assert moved > 1e-3


def test_zero3_partitions_the_fused_table(runs):
    for rank in (0, 1):
        r = runs[1][rank]["partition"]
        assert r["ds_numel"] == r["full"]
        assert r["local"] == -(-r["full"] // 2)  # each rank holds half (rounded up)
        assert r["visible"] == 0  # outside a forward the full table is not materialised
        assert r["loss_finite"]
