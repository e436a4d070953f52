"""Serving tests need the API's stack (sqlmodel); a bare GPU box running `make gpu` has only the model stack."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("sqlmodel") else ["test_*.py"]
