"""Benchmarks behind ``multipole bench``: each checks its outputs before timing them."""
