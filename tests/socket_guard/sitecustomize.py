"""Loaded by every Python child whose PYTHONPATH starts with this folder (socket_guard.child_environment):
installs the socket guard of ``__init__.py`` before the child's own code runs."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_socket_guard", os.path.join(os.path.dirname(os.path.abspath(__file__)), "__init__.py")
)
_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_guard)
_guard.install()
