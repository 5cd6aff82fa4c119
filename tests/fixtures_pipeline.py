"""Fixtures for the pipeline tests (a pytest plugin listed in conftest.py)."""
