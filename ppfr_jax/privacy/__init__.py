"""Privacy evaluation: what each method shows, and what a white-box recovery attack gets back.

For every row of ``config.rows`` (``raw``, ``duetface``, ``minusface``,
``minusface_fixed_theta``): SSIM / PSNR (in [0, 1], PSNR capped at 100 dB)
between the protected view, decoded to 112x112 RGB, and the face; then a U-Net
inversion model trained with L1 on the training identities (it knows the method
and holds the client's weights) is run on held-out faces: SSIM / PSNR of the
recovered faces and the verification accuracy an independent recogniser reaches
on them (lower is more private; its accuracy on the originals is the ceiling).

``run_privacy(config, workdir)`` writes ``privacy.json``, ``privacy.md``,
``privacy_<method>.png`` and TensorBoard scalars; ``ppfr-privacy`` is its CLI
(``ppfr_jax.cli.privacy``). Rows, ranges, the attacker and the outputs in detail:
README, "Privacy evaluation".
"""
from ppfr_jax.privacy.attacker import (Attacker, EvalSet, build_attacker, load_eval_set, load_recognizer,
                                       recognizer_accuracy, run_attack, train_attacker)
from ppfr_jax.privacy.metrics import PSNR_CAP, to_unit, visual_metrics
from ppfr_jax.privacy.report import grid_file_name, make_grid, markdown_table
from ppfr_jax.privacy.suite import run_privacy
from ppfr_jax.privacy.views import (FIXED_FRESH, FIXED_SAME, ROWS, Representation, RowUnavailable,
                                    duetface_server_image, duetface_server_view, fixed_theta, load_duetface,
                                    load_minusface_generator, minusface_view, raw_view)

__all__ = ["Attacker", "EvalSet", "FIXED_FRESH", "FIXED_SAME", "PSNR_CAP", "ROWS", "Representation",
           "RowUnavailable", "build_attacker", "duetface_server_image", "duetface_server_view", "fixed_theta",
           "grid_file_name", "load_duetface", "load_eval_set", "load_minusface_generator", "load_recognizer",
           "make_grid", "markdown_table", "minusface_view", "raw_view", "recognizer_accuracy", "run_attack",
           "run_privacy", "to_unit", "train_attacker", "visual_metrics"]
