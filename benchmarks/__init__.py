"""gradlab's benchmarks: each measurement against its baseline, in the same run, on the same
machine. Run ``python -m benchmarks [--quick] [--json]``; see ``benchmarks/suite.py``."""
