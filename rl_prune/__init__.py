"""The run layer: typed run configs and their loader, the run folder, the prune → fine-tune → report → export
pipeline, the evaluation of a pruned model, the ViT run and the command lines built on them.

``from rl_prune.pipeline import run``; ``from rl_prune.config import load_config``; the CLIs are ``rl_prune.cli``.
"""
