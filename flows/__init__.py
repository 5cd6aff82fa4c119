"""Prefect flows: thin composition of agemem functions."""
