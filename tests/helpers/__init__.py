"""What several test files share: the tiny config and its datasets, small model folders
written with random weights, run helpers, the GCS emulator. Test files import from here
(`from helpers.training import load_config`; pytest puts tests/ on the path through
pyproject.toml's `pythonpath`), never from one another."""
