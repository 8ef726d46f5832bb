"""Budget caps: the run's (`budget.max_cost_usd`) and each endpoint's (`<endpoint>.max_cost_usd`).

A request goes out only if what was spent (the ledger's total when the stage began plus what it paid since),
what is reserved for requests in flight (at their estimated cost) and its own estimate stay under every cap
that applies; otherwise the stage stops cleanly and the requests in flight finish.
"""

from __future__ import annotations

from collections import defaultdict

from pipeline.core.stage import StageStopped


class BudgetExceeded(StageStopped):
    """A cap is reached: the stage stops with everything so far saved; the message says which cap to raise."""


class Budget:
    """Spent and reserved dollars per endpoint, checked against the run cap and the endpoints' caps."""

    def __init__(self, run_cap: float | None = None, spent: dict[str, float] | None = None):
        self.run_cap = run_cap
        self._caps: dict[str, tuple[float, str]] = {}
        self._spent: defaultdict[str, float] = defaultdict(float, spent or {})
        self._reserved: defaultdict[str, float] = defaultdict(float)

    def set_cap(self, endpoint: str, cap: float | None, key: str) -> None:
        """`key` is where the cap is set in the recipe (`teacher`, `endpoints.judge`), for the message."""
        if cap is not None:
            self._caps[endpoint] = (cap, key)

    def spent(self, endpoint: str | None = None) -> float:
        return sum(self._spent.values()) if endpoint is None else self._spent[endpoint]

    def reserve(self, endpoint: str, usd: float) -> None:
        """Hold `usd` for a request about to go out, or raise BudgetExceeded if a cap would be passed."""
        if self.run_cap is not None:
            total = self.spent() + sum(self._reserved.values())
            if total + usd > self.run_cap:
                raise BudgetExceeded(f"run budget reached: ${self.spent():.4f} spent of budget.max_cost_usd="
                                     f"${self.run_cap:.2f}; raise budget.max_cost_usd and rerun the same command "
                                     "to continue")
        if endpoint in self._caps:
            cap, key = self._caps[endpoint]
            if self._spent[endpoint] + self._reserved[endpoint] + usd > cap:
                label = "teacher" if key == "teacher" else f"endpoint '{endpoint}'"
                raise BudgetExceeded(f"{label} budget reached: ${self._spent[endpoint]:.4f} spent of "
                                     f"{key}.max_cost_usd=${cap:.2f}; raise {key}.max_cost_usd and rerun the same "
                                     "command to continue")
        self._reserved[endpoint] += usd

    def release(self, endpoint: str, usd: float) -> None:
        self._reserved[endpoint] = max(0.0, self._reserved[endpoint] - usd)

    def charge(self, endpoint: str, usd: float) -> None:
        self._spent[endpoint] += usd
