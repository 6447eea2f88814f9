"""Serving: one base model in memory, adapters from a store, routed and batched generation."""
