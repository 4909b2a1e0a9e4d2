"""Test suite (a package so `tests.helpers` imports from any test)."""
