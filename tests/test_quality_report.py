"""bench.quality_report: retrieval hits pooled over runs of the same method."""

from bench.quality_report import pooled_passkey_table, wilson_interval


def _row(method: str, hits: int, trials: int, density: float) -> dict:
    return dict(
        task="uuid", n=4096, method=method, hits=hits, trials=trials, accuracy=hits / trials, density=density
    )


def test_runs_of_one_method_pool_their_hits_trials_and_density():
    rows = [_row("PBS", 10, 24, 0.5), _row("PBS", 13, 24, 0.6), _row("dense", 20, 24, 1.0)]
    table = pooled_passkey_table({"passkey": rows}).splitlines()
    low, high = wilson_interval(23, 48)
    assert table[2] == f"| uuid | 4096 | PBS | 2 | 0.550 | 23/48 | {low:.2f}-{high:.2f} |"
    assert len(table) == 3  # dense ran once: nothing to pool


def test_no_table_without_repeated_methods():
    assert pooled_passkey_table({"passkey": [_row("PBS", 1, 2, 0.5), _row("dense", 2, 2, 1.0)]}) == ""


def test_wilson_interval_contains_the_rate_and_stays_in_bounds():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    low, high = wilson_interval(12, 24)
    assert low < 0.5 < high and high - low < 0.45
