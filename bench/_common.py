"""Helpers shared by the bench scripts: JSON lines with the producing command."""
import json
import platform
import re
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


# ---------------------------------------------------------------------------------------------
# Where the time goes: a jax.profiler trace of a compiled step, summed per HLO instruction.

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")


def hlo_instructions(hlo_text: str) -> dict:
    """``{name: (opcode, shape, op_name metadata, kind)}`` of every instruction of an HLO module.

    ``kind`` classifies what the instruction computes: ``convolution`` (a convolution, or a
    fusion / custom call that contains or is one: cuDNN on GPU), ``dot`` (matmuls, and
    cuBLAS calls, and XLA:CPU library fusions such as YNNPACK's that contain one), ``layout copy``
    (copy/transpose), ``collective``, ``fusion`` (other fused elementwise/reduce loops) or the opcode.
    """
    bodies, cur = {}, None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(1)
            bodies[cur] = []
        elif cur is not None:
            bodies[cur].append(line)
    body_ops = {k: " ".join(v) for k, v in bodies.items()}
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        meta = re.search(r'op_name="([^"]*)"', rest)
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        inner = body_ops.get(called.group(1), "") if called else ""
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        target = target.group(1) if target else ""
        if op == "convolution" or " convolution(" in inner or "conv" in target.lower():
            kind = "convolution"
        elif op == "dot" or " dot(" in inner or "gemm" in target.lower() or "matmul" in target.lower():
            kind = "dot"
        elif op in ("copy", "transpose") or re.match(r"(transpose|copy)", name):
            kind = "layout copy"
        elif op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute") \
                or re.match(r"(all-reduce|all-gather|reduce-scatter)", name):
            kind = "collective"
        elif op == "fusion":
            kind = "fusion"
        else:
            kind = op
        out[name] = (op, shape.strip(), meta.group(1) if meta else "", kind)
    return out


def _phase(op_name: str) -> str:
    if "transpose(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "update/other" if op_name else "unattributed"


def profile_breakdown(trace_dir: str, hlo_text: str, steps: int, top: int = 15) -> dict:
    """Sum a ``jax.profiler`` trace of ``steps`` steps per instruction of the compiled module.

    Reads the newest ``*.xplane.pb`` under ``trace_dir`` with ``jax.profiler.ProfileData``. On a
    GPU/TPU the device's "XLA Ops" lines are used: one event per executed instruction, its
    kernel time, so the per-op figures are exact and add up to the device's busy time. On the
    CPU, the events of the XLA threads named after an instruction of ``hlo_text`` (the compiled
    module's ``as_text()``) are used; nested events count once. XLA:CPU runs some instructions
    asynchronously (its own convolutions and dots, on its intra-op pool): their event marks the
    dispatch and a later ``end: <name>`` event the completion, so for those the span from one to
    the other is counted (``async_ops`` says which kinds). Synchronous instructions on the two
    threads, and an asynchronous one beside them, can overlap: on the CPU the total can exceed
    the wall time, and each figure is the time that instruction was running or in flight.

    Returns ms per step: ``timed_ms_per_step``, ``by_kind``, ``by_phase``, ``by_phase_kind``
    (each with its share of the total), ``top_ops``, and ``async_ops`` (count and kinds).
    """
    import glob
    import os

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir!r}: was the step traced?")
    instrs = hlo_instructions(hlo_text)
    prof = jax.profiler.ProfileData.from_file(files[-1])
    device_lines = [ln for pl in prof.planes if pl.name.startswith("/device:") for ln in pl.lines
                    if ln.name == "XLA Ops"]
    lines = device_lines or [ln for pl in prof.planes if pl.name.startswith("/host:")
                             for ln in pl.lines if not ln.name.startswith("python")]
    events, done = [], {}
    for ln in lines:
        for ev in ln.events:
            if ev.name.startswith("end: ") and ev.name[5:] in instrs:
                done.setdefault(ev.name[5:], []).append(ev.start_ns)
            elif ev.name in instrs:
                events.append((ln.name, ev.start_ns, ev.start_ns + ev.duration_ns, ev.name))
    for v in done.values():
        v.sort()
    per_op, asynchronous, last_end = {}, set(), {}
    for line, start, stop, name in sorted(events):
        if start < last_end.get(line, -1):  # nested in an instruction already counted
            continue
        last_end[line] = stop
        ends = done.get(name, [])
        later = next((e for e in ends if e >= start), None)  # this instance's completion
        if later is not None:
            ends.remove(later)
            if later - stop > 50_000:  # completed > 50 us after its dispatch returned
                asynchronous.add(name)
                stop = later
        per_op[name] = per_op.get(name, 0.0) + (stop - start) / 1e6 / steps
    total = sum(per_op.values())
    if not total:
        raise ValueError(f"the trace in {trace_dir!r} has no events of the compiled module's instructions")

    def group(key):
        acc = {}
        for n, ms in per_op.items():
            acc[key(n)] = acc.get(key(n), 0.0) + ms
        return {k: {"ms": round(v, 2), "share": round(v / total, 4)}
                for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}

    async_kinds = {}
    for n in asynchronous:
        async_kinds[instrs[n][3]] = async_kinds.get(instrs[n][3], 0) + 1
    ops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return {
        "source": "device XLA Ops" if device_lines else "host XLA threads",
        "timed_ms_per_step": round(total, 2),
        "by_kind": group(lambda n: instrs[n][3]),
        "by_phase": group(lambda n: _phase(instrs[n][2])),
        "by_phase_kind": group(lambda n: f"{_phase(instrs[n][2])}/{instrs[n][3]}"),
        "top_ops": [{"op": n, "ms": round(ms, 2), "share": round(ms / total, 4), "kind": instrs[n][3],
                     "shape": instrs[n][1][:80], "source": instrs[n][2][-120:]} for n, ms in ops],
        "async_ops": {"count": len(asynchronous), "kinds": async_kinds},
    }
