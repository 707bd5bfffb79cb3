"""``ppfr-import``: a PyTorch checkpoint (read without torch) -> an Orbax checkpoint of Flax variables.

``ppfr-import --pth FILE --model NAME --out DIR``: ``NAME`` is any entry of
``ppfr_jax.models.BACKBONES``. Errors (unreadable or unsafe file, keys or
shapes that do not match the model, an existing DIR without ``--force``) are
one line ``ppfr-import: error: ...`` and exit code 2.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from ppfr_jax import checkpoint_import, models
from ppfr_jax.cli import error_exit, run_cli
from ppfr_jax.torch_pickle import CheckpointReadError, load_state_dict

PROG = "ppfr-import"


def _parse_model_args(items) -> dict:
    import ast

    out = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _shorten_sections(msg: str, keep: int = 20) -> str:
    """Keep the first ``keep`` indented lines under each heading (a wrong --model lists every key)."""
    out, shown, hidden = [], 0, 0
    for line in msg.splitlines() + ["<end>"]:
        if not line.startswith(" "):
            if hidden:
                out.append(f"  ... and {hidden} more")
            shown = hidden = 0
            if line != "<end>":
                out.append(line)
        elif shown < keep:
            out.append(line)
            shown += 1
        else:
            hidden += 1
    return "\n".join(out)


def _main(argv=None) -> int:
    """``ppfr-import --pth FILE --model NAME --out DIR``: convert PyTorch weights to Orbax.

    Reads the checkpoint with ``ppfr_jax.torch_pickle`` (no torch, no pickled
    code), maps it with the model's ``import_torch_state_dict`` (or
    ``torch_to_flax``), and writes ``{'params', 'batch_stats'}`` with
    ``orbax.checkpoint.StandardCheckpointer`` to DIR (restore with
    ``StandardCheckpointer().restore(DIR)``). Returns the exit status.
    """
    p = argparse.ArgumentParser(
        prog="ppfr-import",
        description="Convert a PyTorch checkpoint (read without torch) into an Orbax checkpoint of "
                    "Flax variables {'params', 'batch_stats'}.")
    p.add_argument("--pth", required=True, help="PyTorch checkpoint (.pth/.ckpt, zip or legacy format)")
    p.add_argument("--model", required=True, help=f"one of: {', '.join(sorted(models.BACKBONES))}")
    p.add_argument("--out", required=True, help="output directory of the Orbax checkpoint")
    p.add_argument("--input-channels", type=int, default=None,
                   help="input channels of the model (default: the registry's, e.g. 30 for duetface_client)")
    p.add_argument("--key", default=None,
                   help="where the state_dict sits in the checkpoint, '/'-separated (default: found)")
    p.add_argument("--prefix", default=None,
                   help="use only the keys under this prefix, with it removed (a sub-model of a larger "
                        "checkpoint, e.g. 'generator.backbone.' or 'recognizer.'); 'module.' is always "
                        "dropped when every key has it")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor argument of the Linen model (repeatable; VALUE a Python literal)")
    p.add_argument("--force", action="store_true", help="overwrite DIR if it exists")
    args = p.parse_args(argv)

    if args.model not in models.BACKBONES:
        return error_exit(PROG, f"unknown model {args.model!r}; known: {', '.join(sorted(models.BACKBONES))}")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.force:
        return error_exit(PROG, f"{out} exists (use --force to overwrite)")
    try:
        # the checkpoint first: a bad file fails before any model is traced
        sd = load_state_dict(args.pth, key=args.key)
        if args.prefix:
            total = len(sd)
            sd = {k[len(args.prefix):]: v for k, v in sd.items() if k.startswith(args.prefix)}
            if not sd:
                raise KeyError(f"none of the {total} state_dict keys starts with --prefix {args.prefix!r}")
        model, module, target, shape = checkpoint_import.build_import_target(
            args.model, args.input_channels, _parse_model_args(args.model_arg))
        importer = getattr(module, "import_torch_state_dict", None)
        if importer is not None:
            variables = importer(sd, target)
        else:
            variables = checkpoint_import.torch_to_flax(sd, target, ignore=models.BACKBONES[args.model].ignore)
    except (checkpoint_import.UnknownModelError, CheckpointReadError, checkpoint_import.CheckpointMismatchError,
            FileNotFoundError, KeyError, ValueError) as e:
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)  # KeyError's str() adds quotes
        return error_exit(PROG, _shorten_sections(msg))

    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out, variables, force=args.force)
        ckptr.wait_until_finished()

    counts = {col: sum(int(np.prod(v.shape)) for _, v in checkpoint_import._flatten(tree)) for col, tree in variables.items()}
    leaves = {col: sum(1 for _ in checkpoint_import._flatten(tree)) for col, tree in variables.items()}
    print(f"ppfr-import: {args.pth}")
    print(f"  model       {args.model} ({type(model).__name__}, input NHWC {shape})")
    print(f"  state_dict  {len(sd)} tensors, {sum(int(np.asarray(v).size) for v in sd.values()):,} values")
    for col in variables:
        print(f"  {col:<11} {leaves[col]} arrays, {counts[col]:,} values")
    print(f"  wrote       {out}")
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
