"""Max-trainable-length search: double until the first failure, then bisect to a relative precision.

Pure logic, no torch. `try_len(L)` returns True when a full optimizer step at length L completed
(forward, backward, optimizer step), False on out-of-memory. The search assumes monotonicity
(if L fails, every longer length fails); a flaky try (fragmentation after an earlier OOM) can make it
report a smaller max than the true one, never a larger one, since every reported max_ok did complete.

On GPU, run each try in the same process after freeing memory (gc + torch.cuda.empty_cache()), which
is fast but can underestimate after an OOM left the caching allocator fragmented; the worker's
`--subprocess-per-try` mode isolates each try in a fresh process at the cost of re-initialising.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

__all__ = ["SearchResult", "find_max_length"]


class SearchResult(NamedTuple):
    max_ok: int | None          # longest length that completed (None: even `start` failed / nothing tried)
    first_fail: int | None      # shortest length that failed (None: `limit` itself completed)
    tried: list                 # [(length, ok), ...] in the order tried (lengths from `known` are not repeated)

    def precision(self) -> float | None:
        """(first_fail - max_ok) / max_ok, or 0.0 when the limit passed, None when nothing passed."""
        if self.max_ok is None:
            return None
        if self.first_fail is None:
            return 0.0
        return (self.first_fail - self.max_ok) / self.max_ok

    def converged(self, rel_tol: float = 0.10) -> bool:
        p = self.precision()
        return self.max_ok is None and self.first_fail is not None or (p is not None and p <= rel_tol + 1e-12)


def _round_down(x: int, multiple: int) -> int:
    return max(multiple, (x // multiple) * multiple)


def find_max_length(try_len: Callable[[int], bool], start: int, limit: int, rel_tol: float = 0.10, *,
                    multiple_of: int = 1, known: Mapping[int, bool] | None = None,
                    can_try: Callable[[int], bool] | None = None) -> SearchResult:
    """Largest L in [start, limit] with try_len(L) True, to within `rel_tol` relative precision.

    Doubling from `start` (start, 2*start, ... capped at `limit`) until a failure, then bisection between
    the last success and the first failure until (fail - ok) / ok <= rel_tol. Midpoints are rounded down to
    `multiple_of` (e.g. 1024 tokens). `known` gives results already measured (not re-tried). When
    `can_try(L)` returns False before a try (a wall-clock budget), the search stops and returns the bounds
    it has: a partial result, see `.converged(rel_tol)`.
    """
    if start <= 0 or limit < start:
        raise ValueError(f"need 0 < start <= limit, got start={start}, limit={limit}")
    if rel_tol <= 0:
        raise ValueError("rel_tol must be > 0")
    results: dict[int, bool] = dict(known or {})
    tried: list = []

    def attempt(n: int) -> bool | None:
        if n in results:
            return results[n]
        if can_try is not None and not can_try(n):
            return None
        ok = bool(try_len(n))
        results[n] = ok
        tried.append((n, ok))
        return ok

    lo: int | None = None   # largest known success
    hi: int | None = None   # smallest known failure
    n = start
    while True:
        ok = attempt(n)
        if ok is None:
            return SearchResult(lo, hi, tried)
        if not ok:
            hi = n
            break
        lo = n
        if n >= limit:
            return SearchResult(lo, None, tried)
        n = min(2 * n, limit)
    if lo is None:
        return SearchResult(None, hi, tried)
    # tighten with anything already known inside the bracket (e.g. fixed-length rows measured before)
    lo = max([lo] + [k for k, v in results.items() if v and lo < k < hi])
    hi = min([hi] + [k for k, v in results.items() if not v and lo < k < hi])
    while (hi - lo) / lo > rel_tol:
        mid = _round_down((lo + hi) // 2, multiple_of)
        if mid <= lo or mid >= hi:
            break  # granularity reached
        ok = attempt(mid)
        if ok is None:
            break
        if ok:
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, hi, tried)
