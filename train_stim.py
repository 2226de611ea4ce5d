#!/usr/bin/env python3
"""Train a timm model with stimulative training (ST / ST++), or without (the baseline).

    python train_stim.py /data/imagenet --model resnet50 --stim-kl-minus
    python train_stim.py -c hparams/cifar10_quick_cpu.yaml data/cifar10-mini

The same command is installed as ``stim-train``; the wiring lives in ``stim_timm/cli/train.py``.
"""
import sys

from stim_timm.cli.train import main

if __name__ == '__main__':
    sys.exit(main())
