"""``dualsn demo``: an SN-GAN discriminator trained in PyTorch, ported to Paddle, then both in
lockstep (:mod:`dualsn.demo`)."""

from __future__ import annotations

from dualsn.cli._common import EXIT_CHECK_FAILED, EXIT_MISSING, EXIT_OK, EXIT_USAGE, CLIError


def add_demo_parser(subparsers) -> None:
    from dualsn import demo

    p = subparsers.add_parser(
        "demo",
        help="train an SN-GAN discriminator in PyTorch, port it to Paddle, train both in lockstep",
        description="Builds a small SN-GAN discriminator in PyTorch (fixed seed), trains it on "
        "synthetic data, ports it to Paddle with dualsn.port and trains both on the same batches, "
        "printing each layer's sigma and the largest relative torch/Paddle difference per step. "
        "Exits 1 if a difference exceeds --rtol. Needs both frameworks; downloads nothing.",
    )
    p.add_argument("--steps", type=int, default=demo.STEPS,
                   help=f"lockstep steps after the port (default {demo.STEPS})")
    p.add_argument("--torch-steps", type=int, default=demo.TORCH_STEPS,
                   help=f"steps in PyTorch alone before the port (default {demo.TORCH_STEPS})")
    p.add_argument("--batch", type=int, default=demo.BATCH, help=f"batch size (default {demo.BATCH})")
    p.add_argument("--lr", type=float, default=demo.LR, help=f"SGD learning rate (default {demo.LR})")
    p.add_argument("--seed", type=int, default=demo.SEED, help=f"seed of everything (default {demo.SEED})")
    p.add_argument("--rtol", type=float, default=demo.RTOL,
                   help=f"largest relative torch/Paddle difference accepted (default {demo.RTOL:g})")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (by default it is shown when stderr is a terminal)")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from dualsn import demo

    for option, value, low in (("--steps", args.steps, 1), ("--torch-steps", args.torch_steps, 0),
                               ("--batch", args.batch, 1), ("--seed", args.seed, 0)):
        if value < low:
            raise CLIError(EXIT_USAGE, f"{option} {value}: expected an integer >= {low}")
    if not (args.rtol > 0 and args.lr > 0):
        raise CLIError(EXIT_USAGE, "--rtol and --lr must be > 0")
    try:
        result = demo.run(steps=args.steps, torch_steps=args.torch_steps, batch=args.batch,
                          seed=args.seed, rtol=args.rtol, lr=args.lr, progress=args.progress)
    except demo.MissingFramework as e:
        raise CLIError(EXIT_MISSING, str(e)) from None
    return EXIT_OK if result.ok else EXIT_CHECK_FAILED
