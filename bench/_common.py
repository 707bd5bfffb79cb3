"""Helpers shared by the bench scripts: JSON lines with the producing command."""
import json
import platform
import shlex
import sys
import time

import jax


def command() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1]] + sys.argv)


def cpu_model() -> str:
    """The host CPU's model name (Linux), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def emit(record: dict) -> str:
    """Print ``record`` as one JSON line (with device, versions and the command); returns the line."""
    record = dict(record)
    record.setdefault("device", str(jax.devices()[0].device_kind))
    record.setdefault("backend", jax.default_backend())
    record.setdefault("jax", jax.__version__)
    record.setdefault("machine", platform.machine())
    record.setdefault("cpu", cpu_model())
    record["command"] = command()
    line = json.dumps(record)
    print(line, flush=True)
    return line


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


def memory_stats(compiled) -> dict:
    """XLA's buffer accounting of a compiled executable, per device (bytes).

    ``peak_bytes`` = arguments + outputs - aliased (donated inputs reused as
    outputs) + temporaries: the live set XLA plans for one call.
    """
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                            "temp_size_in_bytes", "generated_code_size_in_bytes")
           if hasattr(m, k)}
    out["peak_bytes"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                         - out.get("alias_size_in_bytes", 0) + out.get("temp_size_in_bytes", 0))
    return out


def compiled_memory(fn, *args) -> dict:
    """``memory_stats`` of ``jax.jit(fn)`` compiled for ``args``."""
    return memory_stats(jax.jit(fn).lower(*args).compile())
