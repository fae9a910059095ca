#!/usr/bin/env python
"""Per-parameter gradient norms of the first iterations of a training run.

    OMP_NUM_THREADS=1 .venv/bin/python projects/TBD/benchmarks/grad_norms.py \\
        --iters 330 --output grad_norms.jsonl -- \\
        --config-file projects/TBD/configs/shapes/tbd_R18_FPN256_to_R18_FPN64.yaml SEED 2 ...

Everything after ``--`` is ``train_net.py``'s command line. The run trains as ``train_net.py``
would and stops after ``--iters`` optimizer steps; before each step it writes one JSON line:
the iteration, the global gradient norm, the median and the three largest per-parameter norms
(with the parameters' names). It is how the clip value of the benchmarks' gradient-clipping check
was chosen: Detectron2 v0.6's ``SOLVER.CLIP_GRADIENTS`` clips each parameter on its own
(``CLIP_TYPE`` norm), so the per-parameter norms of a normal run say which value only cuts spikes.
The training log goes where ``train_net.py`` puts it, and ends with the traceback of the
exception that stops the run (``_Stop``: expected). ``--summary FILE...`` prints a Markdown table
of logs already written: per file, the largest per-parameter norm (iteration, parameter), the
steps with a parameter above ``--spike`` and the median global norm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


class _Stop(Exception):
    """Raised after the last logged step: ends the training run early, on purpose."""


def logging_optimizer(optimizer, names: dict, out, iters: int):
    """``optimizer`` with a step that first logs the gradient norms (its class is swapped, as
    Detectron2 does for gradient clipping, so the LR scheduler's wrapper still applies)."""
    base = type(optimizer)
    count = [0]

    def step(self, *args, **kwargs):
        norms = sorted(((p.grad.norm().item(), names.get(id(p), "?"))
                        for g in self.param_groups for p in g["params"] if p.grad is not None),
                       reverse=True)
        total = sum(n * n for n, _ in norms) ** 0.5
        median = statistics.median(n for n, _ in norms)
        out.write(json.dumps({"it": count[0], "total": total, "median": median,
                              "top": norms[:3]}) + "\n")
        out.flush()
        count[0] += 1
        if count[0] > iters:
            raise _Stop
        return base.step(self, *args, **kwargs)

    optimizer.__class__ = type(base.__name__ + "WithNormLog", (base,), {"step": step})
    return optimizer


def summary(paths: list[str], spike: float) -> str:
    """Markdown table of gradient-norm logs (see the module docstring)."""
    lines = [f"| log | steps | largest parameter norm (iteration, parameter) | steps with a "
             f"parameter above {spike:g} | median global norm |", "|---|---|---|---|---|"]
    for path in paths:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        top = max(rows, key=lambda r: r["top"][0][0])
        above = [r["it"] for r in rows if r["top"][0][0] > spike]
        lines.append(f"| {Path(path).name} | {len(rows)} | {top['top'][0][0]:.1f} ({top['it']}, "
                     f"`{top['top'][0][1]}`) | {len(above)}"
                     + (f": {', '.join(map(str, above[:12]))}{' ...' * (len(above) > 12)}"
                        if above else "")
                     + f" | {statistics.median(r['total'] for r in rows):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, help="optimizer steps to log")
    p.add_argument("--output", help="JSON-lines file to write")
    p.add_argument("--summary", nargs="+", metavar="FILE", help="summarise logs instead")
    p.add_argument("--spike", type=float, default=10.0, help="--summary's spike threshold")
    args = p.parse_args(argv[:split])
    if args.summary:
        print(summary(args.summary, args.spike))
        return 0
    if args.iters is None or args.output is None:
        p.error("--iters and --output are required to log a run (or give --summary FILE...)")
    # Only to log a run: --summary needs no Detectron2.
    from tbd.engine import DistillTrainer, argument_parser, setup_config, train

    train_args = argument_parser().parse_args(argv[split + 1:])
    if train_args.eval_only or train_args.num_gpus != 1:
        sys.exit("grad_norms.py logs one training process: drop --eval-only / --num-gpus.")
    cfg = setup_config(train_args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as out:
        class LoggingTrainer(DistillTrainer):
            """The project's trainer with a logging optimizer, for this run only."""

            @classmethod
            def build_optimizer(cls, cfg, model):
                names = {id(q): n for n, q in model.named_parameters()}
                return logging_optimizer(super().build_optimizer(cfg, model), names, out,
                                         args.iters - 1)

        try:
            train(cfg, train_args, LoggingTrainer)
        except _Stop:
            pass
    print(f"wrote {args.iters} steps to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
