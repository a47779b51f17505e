"""Operators of Multipole Attention: one folder per op, a float32 PyTorch reference in each.

Imports point one way: ``ops`` depends on nothing else in the package.
"""
