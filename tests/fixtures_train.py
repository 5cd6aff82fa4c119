"""Fixtures for the train tests (a pytest plugin listed in conftest.py)."""
