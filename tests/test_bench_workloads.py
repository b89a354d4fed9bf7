"""The workload matrix's bookkeeping (benchmarks/bench_workloads.py): the ratio and its
per-round quartiles, and --append replacing a re-measured cell. No timing is asserted."""

from __future__ import annotations

import pytest

from benchmarks.bench_workloads import Timings, _latest, static_compile_kwargs


def test_ratio_is_of_the_medians_and_its_quartiles_are_per_round():
    rounds = {"stock": [10.0, 12.0, 30.0, 11.0], "fastlm": [5.0, 6.0, 10.0, 11.0]}
    t = Timings(rounds)
    assert t["stock"] == 11.5 and t["fastlm"] == 8.0
    r = t.ratio("fastlm")
    assert r["ratio"] == pytest.approx(11.5 / 8.0)
    # per round: 2.0, 2.0, 3.0, 1.0 -> quartiles of those, not of the medians
    assert r["ratio_q1"] == pytest.approx(1.25)
    assert r["ratio_q3"] == pytest.approx(2.75)


def test_one_round_has_no_spread():
    r = Timings({"stock": [4.0], "fastlm": [2.0]}).ratio("fastlm")
    assert r == {"ratio": 2.0, "ratio_q1": 2.0, "ratio_q3": 2.0}


def _row(impl, ratio, padding=0.0, neighbour="quiet"):
    return dict(workload="forward", model="minilm", dtype="fp32", neighbour=neighbour,
                shape=dict(batch=8, seq=32, padding=padding), impl=impl, ratio=ratio)  # fmt: skip


def test_append_replaces_a_cell_measured_again_in_its_place():
    rows = [_row("a", 1.0), _row("b", 2.0), _row("a", 3.0, padding=0.5), _row("a", 4.0)]
    got = _latest(rows)
    assert [(r["impl"], r["ratio"]) for r in got] == [("a", 4.0), ("b", 2.0), ("a", 3.0)]
    assert _latest([_row("a", 1.0), _row("a", 2.0, neighbour="busy")]) == [
        _row("a", 1.0),
        _row("a", 2.0, neighbour="busy"),
    ]


def test_static_compile_kwargs_ask_transformers_to_compile_on_cpu():
    """The reference column's generate kwargs: a static cache, and a CompileConfig flagged to
    compile on any device (transformers compiles on CPU only when told to)."""
    pytest.importorskip("transformers")
    kw = static_compile_kwargs()
    assert kw["cache_implementation"] == "static"
    assert kw["compile_config"]._compile_all_devices is True
    assert "_compile_all_devices" not in kw["compile_config"].to_dict()


def test_padding_plot_draws_the_quiet_forward_cells(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.bench_workloads import CONTROL, padding_plot

    rows = [_row(impl, r, padding=p) for impl in ("fastlm.optimize", "fastlm.models")
            for p, r in ((0.0, 1.0), (0.5, 1.8))]  # fmt: skip
    rows += [dict(_row(CONTROL, 1.0), neighbour="busy"), dict(_row("x", 2.0), dtype="bf16")]
    path = tmp_path / "plot.png"
    padding_plot(rows)(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
