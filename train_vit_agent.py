"""Train a ViT jointly with an AgentViT patch-selection agent, or as a baseline with all patches or random masks,
then report accuracy, training time, GFLOPs and images/s: ``python train_vit_agent.py [--config X.yaml] [key=value ...]``.

The logic lives in :mod:`rl_prune.vit_run` (the run) and :mod:`rl_prune.config` (``ViTRunConfig``); this command
line is :func:`rl_prune.cli.vit_main`, also installed as ``rl-prune-vit``.
"""
import sys

from rl_prune.cli import vit_main

if __name__ == "__main__":
    sys.exit(vit_main())
