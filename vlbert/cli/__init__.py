"""The command-line programs: one module per console script (setup.py), each with ``main``."""
