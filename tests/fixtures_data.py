"""Fixtures for the data tests (a pytest plugin listed in conftest.py)."""
