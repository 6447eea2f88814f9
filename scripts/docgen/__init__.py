"""The renderers behind scripts/docs_gen.py: one module per part of the docs."""
