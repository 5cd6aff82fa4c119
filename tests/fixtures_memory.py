"""Fixtures for the memory tests (a pytest plugin listed in conftest.py)."""
