"""``python -m ppfr_jax.main``: the README's training command; the same as ``ppfr-train`` (``ppfr_jax.cli.train``)."""
from absl import flags

from ppfr_jax.cli import train as _train
from ppfr_jax.cli.train import run

flags.adopt_module_key_flags(_train)  # --help here lists --config / --workdir

if __name__ == "__main__":
    run()
