"""What every command sets up first (ppfr_jax.cli.apply_cpu_defaults): the XLA:CPU flag and the glibc malloc tunable."""
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
    env = {k: v for k, v in os.environ.items() if k not in ("PPFR_CPU_DEFAULTS", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"['{FLAG}'] {FLAG}"


MADVISE = "always [madvise] never\n"


def test_malloc_tunable_rules():
    glibc = ("glibc", "2.36")
    assert cli.malloc_tunables({}, glibc, MADVISE) == "glibc.malloc.hugetlb=1"
    # appended to the user's other tunables; theirs for hugetlb wins
    assert (cli.malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc, MADVISE)
            == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert cli.malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, glibc, MADVISE) is None
    # glibc before 2.35 has no such tunable; musl / macOS none at all
    assert cli.malloc_tunables({}, ("glibc", "2.31"), MADVISE) is None
    assert cli.malloc_tunables({}, ("", ""), MADVISE) is None
    # THP always: huge pages anyway; never: none to get
    assert cli.malloc_tunables({}, glibc, "[always] madvise never") is None
    assert cli.malloc_tunables({}, glibc, "always madvise [never]") is None
    assert cli.malloc_tunables({cli.OPT_OUT: "0"}, glibc, MADVISE) is None


def test_command_restarts_once_with_the_tunable():
    import platform
    if cli.malloc_tunables({}) is None:
        import pytest
        pytest.skip(f"this machine gets no malloc tunable (libc {platform.libc_ver()}, THP mode not madvise)")
    code = ("import os, sys; from ppfr_jax import cli; cli.apply_cpu_defaults(); "
            "print(os.getpid(), os.environ['GLIBC_TUNABLES'], os.environ['XLA_FLAGS'], sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("PPFR_CPU_DEFAULTS", "XLA_FLAGS", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", code, "a", "--b"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout  # the restarted process did not restart again
    assert lines[0].split(" ", 1)[1] == f"glibc.malloc.hugetlb=1 {FLAG} ['a', '--b']"
    assert out.stderr.count("ppfr: restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == 1
