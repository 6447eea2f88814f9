"""Every writer of something another tool loads: a run's PEFT adapter and merged model
(`export_run`), a store's adapters for vLLM with its launch command (`export_vllm`), and GGUF
files for llama.cpp (`export_gguf`)."""

from lorachain.export.run import export_run

__all__ = ["export_run"]
