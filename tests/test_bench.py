"""The benchmark's plumbing on a tiny slice (no timing assertions: timing lives in benchmarks)."""


import time

from dop.bench import _time, build_slice, default_policies, format_rows, run_bench
from dop.engine import prune


def test_bench_rows_on_a_tiny_slice():
    rows = run_bench(repeats=1, warmup=0, num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                     num_kv_heads=2, n_system=5, n_vision=16, n_instruction=7)
    names = [r.policy for r in rows]
    assert names == list(default_policies(2))
    by = {r.policy: r for r in rows}
    assert by["stock"].flops == by["identity"].flops and by["identity"].flops_reduction == 0
    assert 0 < by["vision_mlp_from_1"].flops_reduction < by["vision_from_1"].flops_reduction
    assert by["vision_from_0"].flops_reduction > 0.5
    assert "vision_from_0" in format_rows(rows)


def test_slice_groups_match_the_adapter():
    model, inputs, groups = build_slice(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                        num_kv_heads=2, n_system=3, n_vision=9, n_instruction=4)
    with prune(model, default_policies(1)["vision_from_0"]) as pruner:
        model(**inputs, logits_to_keep=1)
    assert pruner.kept_rows[0]["q"] == [groups["system"] + groups["instruction"]]


def test_process_clock_leaves_out_time_the_process_does_not_run():
    """bench.clock=process times this process's CPU only: a sleep (time given to other jobs) is ~0."""
    nap = lambda: time.sleep(0.2)  # noqa: E731
    assert _time(nap, repeats=1, warmup=0, clock="wall") >= 0.2
    assert _time(nap, repeats=1, warmup=0, clock="process") < 0.05
