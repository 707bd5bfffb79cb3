"""The XLA:CPU flags every command turns on by default (ppfr_jax.cli.apply_cpu_xla_defaults)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from ppfr_jax import cli

FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"


def test_defaults_appended_to_existing_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert cli.apply_cpu_xla_defaults(env) == [FLAG]
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 " + FLAG
    # applied twice: nothing more
    assert cli.apply_cpu_xla_defaults(env) == []
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_user_value_and_opt_out_win():
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert cli.apply_cpu_xla_defaults(env) == []
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    for off in ("0", "false", "OFF"):
        env = {cli.OPT_OUT: off}
        assert cli.apply_cpu_xla_defaults(env) == []
        assert "XLA_FLAGS" not in env
    env = {}
    assert cli.apply_cpu_xla_defaults(env) == [FLAG] and env["XLA_FLAGS"] == FLAG


def test_unknown_flag_is_not_added(monkeypatch):
    # an XLA that does not define the flag would abort the process at its first backend: skip it
    monkeypatch.setattr(cli, "CPU_XLA_DEFAULTS", ("--xla_cpu_no_such_flag_ppfr=1",))
    env = {}
    assert cli.apply_cpu_xla_defaults(env) == []
    assert env == {}
    assert cli._xla_knows("xla_cpu_experimental_ynn_fusion_type")


def test_commands_apply_before_any_backend_starts():
    """Importing the commands starts no backend, so the flags they add in their entry point take effect."""
    code = textwrap.dedent("""
        import os, sys
        from ppfr_jax.cli import train, eval as ev, privacy, protect, verify, align, export
        from jax._src import xla_bridge
        assert not xla_bridge._backends, "a command module started a JAX backend at import"
        from ppfr_jax import cli
        added = cli.apply_cpu_xla_defaults()
        import jax
        jax.numpy.ones(2).block_until_ready()
        print(added, os.environ["XLA_FLAGS"])
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PPFR_XLA_CPU_DEFAULTS", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"['{FLAG}'] {FLAG}"
