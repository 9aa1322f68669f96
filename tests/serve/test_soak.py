"""The soak's knee (`pipeline.bench.soak.knee`): where more clients stop buying requests/s."""

from __future__ import annotations

import pytest

from pipeline.bench.serve import Row
from pipeline.bench.soak import knee


def _served(per_s_by_clients: dict[int, float]):
    asked: list[int] = []

    def measure(clients: int) -> Row:
        asked.append(clients)
        return Row("", per_s_by_clients[clients])

    return measure, asked


@pytest.mark.parametrize(
    "per_s, expected_knee, expected_asked",
    [
        # saturates at 4 clients: 8 buys 2 %, the sweep stops there
        ({1: 10.0, 2: 19.0, 4: 30.0, 8: 30.6}, 4, [1, 2, 4, 8]),
        # 4 is within 10 % of the best (8's), and fewer clients
        ({1: 10.0, 2: 19.0, 4: 28.0, 8: 30.0, 16: 30.5}, 4, [1, 2, 4, 8, 16]),
        # more clients lose throughput: the best is before the drop
        ({1: 10.0, 2: 20.0, 4: 12.0}, 2, [1, 2, 4]),
        # one client already saturates the server
        ({1: 10.0, 2: 10.1}, 1, [1, 2]),
    ],
)
def test_the_knee_is_the_fewest_clients_near_the_best_and_the_sweep_stops_past_it(
    per_s, expected_knee, expected_asked
) -> None:
    measure, asked = _served(per_s)
    clients, sweep = knee(measure)
    assert clients == expected_knee
    assert asked == expected_asked
    assert [c for c, _ in sweep] == expected_asked


def test_a_load_that_keeps_growing_stops_at_the_most_clients() -> None:
    measure, asked = _served({n: 10.0 * n for n in (1, 2, 4, 8, 16)})
    clients, _ = knee(measure, most=16)
    assert asked == [1, 2, 4, 8, 16]
    assert clients == 16
