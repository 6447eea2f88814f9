"""Memory of a Router's resident adapters for benchmarks/routing_cost.py: RSS growth with k adapters,
where it goes (weights, Python objects, malloc, pages glibc keeps), and PEFT's own `load_adapter`."""

from __future__ import annotations

from pathlib import Path

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def heap_stats() -> dict:
    """RSS of the process's [heap] (glibc's main arena) and anonymous maps (pymalloc's arenas, big
    mallocs), and bytes glibc has handed out (mallinfo2), MB."""
    import ctypes

    out = {"heap_rss_mb": 0.0, "anon_rss_mb": 0.0}
    name = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                name = "heap_rss_mb" if head[-1] == "[heap]" else "anon_rss_mb" if len(head) == 5 else None
            elif line.startswith("Rss:") and name:
                out[name] += int(head[1]) / 1024

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usm fsm used free keep".split()
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    m = libc.mallinfo2()
    out["malloc_in_use_mb"] = (m.used + m.hblkhd) / 2**20
    return out


def memory_with(store: Path, k: int) -> dict:
    """RSS growth of a Router holding `k` resident task adapters (cache_size > k, nothing evicted)
    over the same Router with only its selector, and where the growth goes. glibc's free
    pages are returned (malloc_trim) before the baseline, so both ends count live memory the same
    way; the growth before the second trim also counts freed pages glibc still holds."""
    import ctypes
    import gc
    import tracemalloc

    from lorachain.serve.router import Router
    from lorachain.store import MIXED, SELECTOR

    libc = ctypes.CDLL("libc.so.6")
    r = Router.from_store(store, cache_size=k + 1)
    names = [*[r.adapters[t] for t in r.labels][:k], MIXED]
    r.activate(SELECTOR)
    gc.collect()
    libc.malloc_trim(0)
    base, stats = rss_mb(), heap_stats()
    for n in names[:k]:
        r.activate(n)
    gc.collect()
    out = {"adapters": k, "base_rss_mb": base, "rss_mb": rss_mb(), "growth_mb": rss_mb() - base}
    after = heap_stats()
    out |= {key: after[key] - stats[key] for key in stats}
    libc.malloc_trim(0)  # freed load buffers that glibc kept: returned to the OS
    out["growth_after_malloc_trim_mb"] = rss_mb() - base
    res = [x.flat for x in r.slots.lru.values() if x.flat is not None]
    flats = {f.untyped_storage().data_ptr(): f.nbytes for f in res}
    out["lora_param_mb"] = sum(flats.values()) / 2**20  # the adapters' weights as tensors
    out["lora_buffers"] = len(flats)
    out["peft_slots"] = len(r.slots.slots)  # PEFT adapters running them
    tracemalloc.start()  # Python objects of one more adapter (tracing itself costs memory: measured last)
    r.activate(names[k])
    gc.collect()
    out["python_objects_per_adapter_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    return out


def memory_peft_naive(store: Path, k: int) -> dict:
    """The same growth for PEFT's own `load_adapter` of `k` adapters on the bare base."""
    import ctypes
    import gc

    from peft import PeftModel  # imported before the baseline: its code is not adapter memory

    from lorachain.config import ModelConfig
    from lorachain.models import load_model
    from lorachain.store import read_manifest

    manifest = read_manifest(store)
    model = load_model(ModelConfig(name_or_path=MODEL))
    libc = ctypes.CDLL("libc.so.6")
    gc.collect()
    libc.malloc_trim(0)
    base = rss_mb()
    names = [n for n, a in manifest.adapters.items() if a["kind"] == "task"][:k]
    peft = PeftModel.from_pretrained(model, str(store / "adapters" / names[0]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(store / "adapters" / n), adapter_name=n)
    gc.collect()
    out = {"adapters": k, "growth_mb": rss_mb() - base}
    libc.malloc_trim(0)
    out["growth_after_malloc_trim_mb"] = rss_mb() - base
    return out


def breakdown(m: dict, per_adapter_disk: float) -> dict:
    """Where a Router's growth with m['adapters'] adapters goes, MB."""
    k = m["adapters"]
    py = m["python_objects_per_adapter_mb"] * k
    other = m["malloc_in_use_mb"] - m["lora_param_mb"]
    return {
        "on_disk_mb": k * per_adapter_disk,
        "growth_mb": m["growth_mb"],
        "ratio": m["growth_mb"] / (k * per_adapter_disk),
        "ratio_after_malloc_trim": m["growth_after_malloc_trim_mb"] / (k * per_adapter_disk),
        "lora_weights_one_buffer_per_adapter_mb": m["lora_param_mb"],
        "python_objects_mb": py,  # of the resident adapters (the one PEFT slot's are in one_off)
        "other_malloc_in_use_mb": other,  # the PEFT slot's modules, C++ tensor objects, layout tables
        "freed_but_kept_by_glibc_mb": m["growth_mb"] - m["growth_after_malloc_trim_mb"],
        "unattributed_mb": m["growth_after_malloc_trim_mb"] - m["lora_param_mb"] - py - other,
    }


def memory_summary(memory: list[dict], naive: list[dict], per_adapter: float) -> dict:
    """Ratios and where the growth goes at 8 and 32 adapters; adds expected_mb to each row."""
    for m in memory + naive:
        m["expected_mb"] = m["adapters"] * per_adapter
    out = {str(m["adapters"]): breakdown(m, per_adapter) for m in memory[1:]}
    m8, m32 = memory[1], memory[2]
    slope = (m32["growth_mb"] - m8["growth_mb"]) / (m32["adapters"] - m8["adapters"])
    out["marginal_per_adapter_mb"] = slope  # growth per adapter between 8 and 32
    out["marginal_ratio"] = slope / per_adapter
    out["one_off_mb"] = m8["growth_mb"] - m8["adapters"] * slope  # the PEFT slot, first loads, caches
    py, weights = m32["python_objects_per_adapter_mb"], m32["lora_param_mb"] / m32["expected_mb"]
    out["floor"] = (
        "a resident adapter is one fp32 buffer holding exactly its file's data section "
        f"({weights:.2f}x the adapter folder) and a small record ({py * 1024:.1f} KB of Python objects); "
        f"its modules are not kept: {m32['peft_slots']} PEFT adapter slot(s) besides the selector run "
        "every resident adapter, re-pointed at the active one's buffer on a switch (their module "
        "objects, ~0.3 MB, are paid once, in one_off_mb), and mixed batches read the buffers directly. "
        "What is left per adapter is allocator slack around the buffers."
    )
    return out
