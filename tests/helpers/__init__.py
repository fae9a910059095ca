"""Scripts and functions the tests run in other processes (fault injection, DDP workers), and
``run_main``: what projects/TBD/train_net.py's ``main`` does, through the library's functions
(tests import modules, not the script)."""


def run_main(args):
    """Set up, then ``--eval-only`` evaluation or training, as train_net.py does."""
    from tbd.engine import evaluate, setup_config, train

    cfg = setup_config(args)
    return evaluate(cfg, args) if args.eval_only else train(cfg, args)
