"""CachePlan (the one cache decision) and the host cache's row moves."""

import numpy as np
import pytest

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.cache import CachePlan, HostKVCache
from mixtrt.runtime.errors import ArtifactError


def args(window: int | None, layers: int = 3, layer_types=None) -> ModelArgs:
    return ModelArgs("MistralForCausalLM", 100, 16, 32, layers, 2, 1, 8, sliding_window=window,
                     layer_types=layer_types, max_position_embeddings=4096)


@pytest.mark.parametrize("window, max_context, slack, layout, capacity, windows", [
    (64, 1024, 16, "windowed", 80, (64,) * 3),          # W + slack
    (64, 70, 16, "windowed", 70, (64,) * 3),            # never more rows than the context
    (64, 64, 16, "linear", 64, (None,) * 3),            # a window as long as the context never bites
    (64, 32, 16, "linear", 32, (None,) * 3),
    (None, 512, 16, "linear", 512, (None,) * 3),        # no window: row = position
    (64, 1024, 0, "windowed", 64, (64,) * 3),           # a ring backend needs no slack
])
def test_plan_rules(window, max_context, slack, layout, capacity, windows):
    plan = CachePlan.for_model(args(window), max_context, "float32", slack=slack)
    assert (plan.layout, plan.capacity, plan.windows) == (layout, capacity, windows)
    assert plan.window == (window if layout == "windowed" else None)
    assert CachePlan.from_dict(plan.to_dict(), 3) == plan


def test_mixed_layer_types_get_a_linear_cache_that_keeps_the_windows():
    plan = CachePlan.for_model(args(8, layer_types=("sliding_attention", "full_attention", "sliding_attention")),
                               100, slack=16)
    assert plan.layout == "linear" and plan.capacity == 100 and plan.windows == (8, None, 8)


@pytest.mark.parametrize("edit, match", [
    ({"layout": "ring"}, "layout"), ({"capacity": 0}, "capacity"), ({"capacity": "80"}, "capacity"),
    ({"windows": [64, 64]}, "windows"), ({"windows": [64, 0, 64]}, "windows"), ({"window": 32}, "window"),
    ({"capacity": 10}, "capacity >= the window"), ({"dtype": "int8"}, "dtype"),
])
def test_plan_from_a_hand_edited_manifest_is_refused(edit, match):
    d = {**CachePlan.for_model(args(64), 1024, slack=16).to_dict(), **edit}
    with pytest.raises(ArtifactError, match=match):
        CachePlan.from_dict(d, 3)


def filled(rows: int = 4) -> HostKVCache:
    cache = HostKVCache(num_layers=2, batch_size=rows, kv_heads=1, capacity=3, head_dim=2)
    for r in range(rows):
        for buf in (*cache.keys, *cache.values):
            buf[r] = r + 1
        cache.lengths[r] = 10 * (r + 1)
    return cache


@pytest.mark.parametrize("order, want", [
    ([2, 0], [3, 1, 0, 0]),        # finished rows 1 and 3 dropped, the others to the front
    ([0, 1, 2, 3], [1, 2, 3, 4]),  # nothing moves
    ([0, -1, 3], [1, 0, 4, 0]),    # an empty row for a newcomer, a parked row kept behind it
    ([], [0, 0, 0, 0]),
    ([0, 0], [1, 1, 0, 0]),        # a row taken twice is copied (a request's other samples of one prompt)
    ([2, 0, 2, 2], [3, 1, 3, 3]),
])
def test_move_rows(order, want):
    cache = filled()
    keys = cache.keys[0]
    cache.move_rows(order)
    assert [int(cache.keys[1][r, 0, 0, 0]) for r in range(4)] == want
    assert cache.lengths.tolist() == [10 * w for w in want]
    assert cache.keys[0] is keys  # buffers never move (a backend keeps pointers into them)


@pytest.mark.parametrize("order", [[4], [-2], [0, 1, 2, 3, 0]])
def test_move_rows_refuses_impossible_orders(order):
    cache = filled()
    with pytest.raises(ValueError):
        cache.move_rows(order)
    np.testing.assert_array_equal(cache.lengths, [10, 20, 30, 40])
