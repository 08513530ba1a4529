"""Helpers of the tests (no tests here): the app's shared service and server (app_support), tiny random checkpoints
(tiny_checkpoints, tiny_models) and scenes written as files (world_files). tests/conftest.py puts this folder on
sys.path, so a test imports them by module name (`import app_support as S`, `from tiny_checkpoints import ...`),
never as `support.<name>` (a second name would make a second copy of the shared service)."""
