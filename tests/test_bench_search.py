"""bench.search: the step-up max-length search on fake step functions."""

import random

import pytest

from bench.search import find_max_length

K = 1024


def boundary(b):
    calls = []

    def try_len(n):
        calls.append(n)
        return n <= b
    return try_len, calls


def check(res, b, rel_tol=0.10):
    assert res.max_ok is not None and res.max_ok <= b < res.first_fail
    assert (res.first_fail - res.max_ok) / res.max_ok <= rel_tol + 1e-12
    assert res.converged(rel_tol)
    assert all(ok == (n <= b) for n, ok in res.tried)


@pytest.mark.parametrize("b", [16 * K, 100_000, 300 * K, 384 * K - 1, 777_777, 1_500_000])
def test_finds_boundary_to_ten_percent(b):
    try_len, calls = boundary(b)
    res = find_max_length(try_len, 16 * K, 4 * K * K)
    check(res, b)
    assert len(calls) == len(set(calls)), "a length was tried twice"


def test_doubling_then_bisect_order():
    try_len, calls = boundary(100 * K)
    res = find_max_length(try_len, 16 * K, 4 * K * K)
    assert calls[:4] == [16 * K, 32 * K, 64 * K, 128 * K]  # doubling until the first failure
    assert calls[4] == 96 * K                                # then the midpoint
    check(res, 100 * K)


def test_power_of_two_boundary():
    res = find_max_length(boundary(64 * K)[0], 8 * K, 1 << 20)
    check(res, 64 * K)
    assert res.max_ok == 64 * K


def test_always_fail():
    try_len, calls = boundary(0)
    res = find_max_length(try_len, 16 * K, 1 << 20)
    assert (res.max_ok, res.first_fail) == (None, 16 * K)
    assert calls == [16 * K]
    assert res.converged()


def test_always_pass_up_to_non_power_of_two_limit():
    try_len, calls = boundary(10 ** 9)
    res = find_max_length(try_len, 1000, 3000)
    assert calls == [1000, 2000, 3000]
    assert (res.max_ok, res.first_fail) == (3000, None)
    assert res.precision() == 0.0


def test_multiple_of_rounds_midpoints():
    res = find_max_length(boundary(50_000)[0], 4096, 1 << 20, multiple_of=4096)
    assert all(n % 4096 == 0 for n, _ in res.tried)
    assert res.max_ok <= 50_000 < res.first_fail


def test_granularity_stops_bisection():
    # boundary between two adjacent multiples: cannot refine beyond the granularity
    res = find_max_length(boundary(5000)[0], 4096, 1 << 20, rel_tol=0.001, multiple_of=4096)
    assert (res.max_ok, res.first_fail) == (4096, 8192)


def test_known_results_are_not_retried_and_tighten_the_bracket():
    try_len, calls = boundary(100 * K)
    known = {16 * K: True, 32 * K: True, 64 * K: True, 96 * K: True, 112 * K: False}
    res = find_max_length(try_len, 16 * K, 4 * K * K, known=known)
    assert not set(calls) & set(known)
    check(res, 100 * K)


def test_budget_stops_with_partial_result():
    try_len, calls = boundary(100 * K)
    res = find_max_length(try_len, 16 * K, 4 * K * K, can_try=lambda n: len(calls) < 5)
    assert len(calls) == 5
    assert res.max_ok == 96 * K and res.first_fail == 128 * K
    assert not res.converged(0.10)


def test_random_boundaries():
    rng = random.Random(0)
    for _ in range(200):
        b = rng.randint(8 * K, 3 * K * K)
        check(find_max_length(boundary(b)[0], 8 * K, 4 * K * K, rel_tol=0.10), b)


def test_bad_arguments():
    with pytest.raises(ValueError):
        find_max_length(lambda n: True, 0, 10)
    with pytest.raises(ValueError):
        find_max_length(lambda n: True, 20, 10)
