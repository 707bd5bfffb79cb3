"""``python -m ppfr_jax.main``: the README's training command; the same as ``ppfr-train`` (``ppfr_jax.cli.train``)."""
from ppfr_jax.cli.train import run

if __name__ == "__main__":
    run()
