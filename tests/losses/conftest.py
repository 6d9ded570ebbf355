"""Fixtures for the loss tests."""
from __future__ import annotations

import pytest

from medcl.losses import _lse


@pytest.fixture(params=["cached", "recomputed"])
def lse_backward(request, monkeypatch):
    """Run an NT-Xent test with both backward strategies of the chunked log-sum-exp.

    "cached" keeps the exponentiated chunks from forward (what NT-Xent does up to
    ``_lse.CACHE_BYTES``, so at every test size); "recomputed" forces the
    O(N * chunk) memory path used for large batches by setting the budget to 0.
    The local losses never cache, so their tests always cover the recomputed path.
    """
    if request.param == "recomputed":
        monkeypatch.setattr(_lse, "CACHE_BYTES", 0)
    return request.param
