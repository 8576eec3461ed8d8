"""Shared test setup: the repo root on sys.path and the optional fixtures beside the checkout."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Reference outputs and real-size key lists live outside the repo; users will not have them.
FIXTURES = ROOT.parent / "shared" / "fixtures"
TAMING_TINY = FIXTURES / "taming" / "tiny_f16"

requires_fixtures = pytest.mark.skipif(
    not TAMING_TINY.is_dir(), reason=f"taming fixtures not found at {FIXTURES} (only present in development)"
)
