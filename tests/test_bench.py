"""bnutils.bench: the bytes-moved model, Timing statistics and table formatting (never times)."""
import pytest

from bnutils import bench


def test_bytes_model_for_the_benchmark_shape():
    s = 4096 * 1024 * 4  # one float32 (4096, 1024) tensor: 16 MiB
    assert s == 16 * 2**20
    assert bench.bn_bytes_moved((4096, 1024), 4, "forward") == 3 * s
    assert bench.bn_bytes_moved((4096, 1024), 4, "backward") == 5 * s
    assert bench.bn_bytes_moved((4096, 1024), 4, "forward+backward") == 8 * s
    assert bench.bn_bytes_moved((4096, 1024), 4, "inference") == 2 * s


def test_bytes_model_scales_with_shape_and_itemsize():
    assert bench.bn_bytes_moved((64, 64, 32, 32), 4) == bench.bn_bytes_moved((4096, 1024), 4)
    assert bench.bn_bytes_moved((8, 3, 5), 8, "backward") == 5 * 8 * 3 * 5 * 8
    assert bench.bn_bytes_moved((0, 3), 4) == 0
    f, b = (bench.bn_bytes_moved((7, 2, 3), 2, p) for p in ("forward", "backward"))
    assert f + b == bench.bn_bytes_moved((7, 2, 3), 2, "forward+backward")


@pytest.mark.parametrize("args, words", [
    (((4, 3), 4, "sideways"), "pass_ must be one of"),
    (((4,), 4, "forward"), "shape must be"),
    (((4, -3), 4, "forward"), "shape must be"),
    (((4, 3), 3, "forward"), "itemsize must be"),
])
def test_bytes_model_errors(args, words):
    with pytest.raises(ValueError, match=words):
        bench.bn_bytes_moved(*args)


def test_bandwidth_fraction():
    assert bench.bandwidth_fraction(10**9, 0.5, 4e9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must be > 0"):
        bench.bandwidth_fraction(10, 0.0, 1.0)


def test_timing_statistics():
    t = bench.Timing.from_samples([0.004, 0.001, 0.003, 0.002, 0.005])
    assert (t.median, t.min, t.n) == (0.003, 0.001, 5)
    assert t.q1 == pytest.approx(0.002) and t.q3 == pytest.approx(0.004)
    assert t.ms == pytest.approx(3.0)
    with pytest.raises(ValueError, match="at least one"):
        bench.Timing.from_samples([])


def test_time_interleaved_calls_every_variant_round_robin():
    calls = []
    result = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                    repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert list(result) == ["a", "b"] and all(t.n == 3 for t in result.values())
    assert bench.time_median(lambda: None, repeats=2, warmup=0).n == 2
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench.time_median(lambda: None, repeats=0)


def test_time_rounds_keeps_one_sample_per_round_from_the_clock():
    ticks = iter(range(100))
    samples = bench.time_rounds({"a": lambda: None, "b": lambda: None}, repeats=3, warmup=2,
                                clock=lambda: float(next(ticks)))
    assert samples == {"a": [1.0] * 3, "b": [1.0] * 3}  # each call spans one clock tick
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench.time_rounds({"a": lambda: None}, repeats=0)


def test_format_table():
    text = bench.format_table([["numpy staged", "12.50", "2.1x"], ["torch", "3.00", "1.0x"]],
                              ["variant", "ms", "ratio"])
    lines = text.splitlines()
    assert lines[0].split() == ["variant", "ms", "ratio"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].startswith("numpy staged") and lines[3].endswith(" 1.0x")
    assert len({len(line) for line in lines[1:]}) == 1  # numbers right-aligned to one width
    with pytest.raises(ValueError, match="every row must have 3 cells"):
        bench.format_table([["x"]], ["a", "b", "c"])


def test_clock_is_used_for_every_sample():
    ticks = iter(range(100))

    def clock():  # each call advances one unit: every sample is 1.0
        return float(next(ticks))

    t = bench.time_median(lambda: None, repeats=4, warmup=1, clock=clock)
    assert t.n == 4 and t.min == t.median == 1.0
    timings = bench.time_interleaved({"a": lambda: None, "b": lambda: None}, repeats=3, warmup=0,
                                     clock=clock)
    assert all(v.median == 1.0 and v.n == 3 for v in timings.values())


def test_thread_time_excludes_sleeping():
    import time
    t = bench.time_median(lambda: time.sleep(0.02), repeats=2, warmup=0, clock=time.thread_time)
    assert t.median < 0.01
