"""``agemem pipeline``: run the Prefect pipeline (filled in by the pipeline issue)."""
