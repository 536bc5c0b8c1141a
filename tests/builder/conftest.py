"""Fixtures of the build tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def base(store):
    """busybox:latest in the test's store, the base of most test builds."""
    from layerfs.bootstrap import bootstrap_busybox

    return bootstrap_busybox(store)
