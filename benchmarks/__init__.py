"""Benchmarks of sessionscope against raw SQLAlchemy and peer libraries.

Run the whole suite with ``python -m benchmarks`` (see ``benchmarks/README.md``).
"""
