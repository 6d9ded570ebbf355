"""Fixtures for the loss tests."""
from __future__ import annotations

import pytest

from medcl.losses import _lse


@pytest.fixture(params=["cached", "recomputed"])
def lse_backward(request, monkeypatch):
    """Run a test with both backward strategies of the chunked log-sum-exp.

    "cached" keeps the exponentiated chunks from forward (small problems, the
    default for test sizes); "recomputed" forces the O(N * chunk) memory path
    used for large N by setting the cache budget to 0.
    """
    if request.param == "recomputed":
        monkeypatch.setattr(_lse, "CACHE_BYTES", 0)
    return request.param
