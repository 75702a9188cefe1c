"""Small services that tests/test_run_process.py runs with ``python -m dig_service run``."""
