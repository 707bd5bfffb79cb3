"""Helpers shared by the bench scripts: JSON lines with the producing command."""
import json
import platform
import shlex
import sys
import time

import jax


def command() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1]] + sys.argv)


def emit(record: dict) -> None:
    record = dict(record)
    record.setdefault("device", str(jax.devices()[0].device_kind))
    record.setdefault("backend", jax.default_backend())
    record.setdefault("jax", jax.__version__)
    record.setdefault("machine", platform.machine())
    record["command"] = command()
    print(json.dumps(record), flush=True)


def time_fn(fn, *args, warmup=1, repeats=5):
    """Median/min wall seconds of fn(*args) (results blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2], ts[0]


def compiled_memory(fn, *args) -> dict:
    """XLA's own accounting of a jitted function's buffers (bytes)."""
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                            "temp_size_in_bytes", "generated_code_size_in_bytes")
           if hasattr(m, k)}
    out["peak_bytes"] = out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0) + out.get(
        "temp_size_in_bytes", 0)
    return out
