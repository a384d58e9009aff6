"""The project's benchmarks, run as modules from the repository root (the packages they measure come installed
by ``make install``), e.g. ``python -m benchmarks.throughput --quick`` or ``python -m benchmarks.sine_table``."""
