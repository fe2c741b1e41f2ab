"""The profile summary's accounting of GPU idle time (bench/profile.py), on made-up kernel intervals."""
from batchllm_dask.bench.profile import busy_union, idle_breakdown


def test_idle_time_is_split_into_setup_tail_and_gaps_by_length():
    # microseconds: setup until 2000, kernels with a 50 us gap, an overlap, a 500 us gap and a 3000 us gap
    kernels = [(2000, 2100), (2150, 2300), (2200, 2400), (2900, 3000), (6000, 6100)]
    idle = idle_breakdown(kernels, start=0, end=7000)
    assert idle == {"before first kernel": 2.0, "after last kernel": 0.9, "gaps under 0.1 ms": 0.05,
                    "gaps 0.1-1 ms": 0.5, "gaps over 1 ms": 3.0}
    busy = busy_union(kernels) / 1e3
    assert abs(busy + sum(idle.values()) - 7.0) < 1e-9  # busy and idle cover the wall exactly


def test_no_kernels_no_idle_figures():
    assert idle_breakdown([], 0, 10) == {}
