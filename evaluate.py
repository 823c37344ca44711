"""Compare an original and a pruned model: test accuracy, MACs, params, file size, latency and throughput, with
optional TorchScript / ONNX exports checked against the module: ``python evaluate.py runs/NAME [--export onnx]``.

The logic lives in :mod:`rl_prune.evaluation`; this command line is :func:`rl_prune.cli.evaluate_main`, also
installed as ``rl-prune-evaluate``.
"""
import sys

from rl_prune.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
