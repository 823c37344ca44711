"""Prune a pretrained CNN with an agent on PruneEnv, fine-tune the result with knowledge distillation and write
a run folder: ``python train_agent.py --config configs/X.yaml [--agent NAME] [--resume] [key=value ...]``.

With no arguments it runs the offline quickstart (configs/quickstart.yaml). The logic lives in the package:
:mod:`rl_prune.pipeline` (the run), :mod:`rl_prune.config` (the config), :mod:`rl_prune.cli` (this command line,
also installed as ``rl-prune-train``).
"""
import sys

from rl_prune.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
