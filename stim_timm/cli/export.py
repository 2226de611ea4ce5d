"""``stim-export``: a sub-network of a trained stim model as a plain, shallower timm model.

    stim-export CKPT --depths 3,3,4,3 --out DIR [--data-dir D] [--push-to-hub ORG/NAME]
"""
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import torch.nn as nn

from ..eval.bn import reestimate_bn
from ..eval.evaluate import eval_loader
from ..models.depths import format_depths, parse_depths, validate_depths
from ..models.subnet import get_stim_model
from ..publish.card import write_card
from ..publish.export import export_card, export_subnet, needs_plugin, plain_architecture, save_plain_model
from ..publish.hub import upload_folder
from ..run.checkpoint import load_trained_model, run_data_config, run_train_transform
from ..run.io import OneLineParser, cli_int, exit_code
from .checks import check_at_least, check_folder, check_needs, check_out, check_sources, check_split
from .preflight import check_hub

__all__ = ['main']


def _reestimate_subnet_bn(model: nn.Module, depths: Tuple[int, ...], args, data_config: Dict[str, Any],
                          run_args: Optional[Dict[str, Any]] = None) -> int:
    """The loaded model's BN statistics become sub-network ``depths``' own (training images and
    transforms, ``stim_timm.eval.bn``); the checkpoint on disk is not touched."""
    validate_depths(depths, get_stim_model(model).stage_depths)
    loader = eval_loader(args.data_dir, args.train_split, data_config, args.batch_size, 0, shuffle=True,
                          training=True, train_transform=run_train_transform(run_args, data_config))
    batches = [x for _, (x, _) in zip(range(args.bn_batches), loader)]
    return reestimate_bn(model, batches, depths)


# flag -> the flag without which it would be ignored
_NEEDS = dict(hub_private='push_to_hub', hub_revision='push_to_hub', train_split='data_dir', bn_batches='data_dir')


def _check_args(args, parser) -> Tuple[int, ...]:
    """Every value, before the checkpoint is read or a file written; the parsed --depths."""
    depths = parse_depths(args.depths)
    check_at_least(args, bn_batches=0, batch_size=1, num_classes=1)
    check_needs(args, {dest: parser.get_default(dest) for dest in _NEEDS}, _NEEDS)
    check_sources([args.checkpoint])
    if args.data_dir is not None:
        check_folder(args.data_dir, '--data-dir')
        if args.bn_batches > 0:
            check_split(args.data_dir, args.train_split, '--train-split')
    check_out(args.out)
    if args.push_to_hub:
        check_hub(args.push_to_hub, '--push-to-hub', offline=False)
    return depths


def _export(args, parser) -> None:
    depths = _check_args(args, parser)
    model, weights = load_trained_model(args.checkpoint, args.model, args.num_classes)
    model.eval()
    if args.data_dir and args.bn_batches > 0:
        seen = _reestimate_subnet_bn(model, depths, args, run_data_config(model, weights.args), weights.args)
        print(f're-estimated the BN statistics of sub-network {list(depths)} on {seen} training images')
    plain = export_subnet(model, depths)
    os.makedirs(args.out, exist_ok=True)
    save_plain_model(plain, args.out, run_data_config(model, weights.args))
    arch = plain_architecture(model)
    params = sum(p.numel() for p in plain.parameters())
    write_card(export_card(arch, depths, model.stage_depths, args.checkpoint, params, needs_plugin(model),
                           args.push_to_hub), args.out)
    print(f'exported {arch} sub-network {list(depths)} ({params / 1e6:.2f}M parameters) to {args.out}')
    if args.push_to_hub:
        url = upload_folder(args.out, args.push_to_hub, private=args.hub_private, revision=args.hub_revision,
                            commit_message=f'Add {arch} sub-network {format_depths(depths)}')
        print(f'pushed to {url}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(
        prog='stim-export', prefix='',
        description='Export a sub-network of a trained stim model as a plain, shallower timm model.')
    parser.add_argument('checkpoint', help='train_stim.py output folder, .pth(.tar) or .safetensors')
    parser.add_argument('--depths', required=True, help='blocks kept per stage, e.g. 3,3,4,3')
    parser.add_argument('--out', required=True, help='output folder (model.safetensors + config.json)')
    parser.add_argument('--model', default=None, help='model name, for a bare weights file')
    parser.add_argument('--num-classes', type=cli_int, default=None, help='class count, for a bare weights file')
    parser.add_argument('--push-to-hub', default=None, metavar='REPO_ID', help='also upload the folder')
    parser.add_argument('--hub-private', action='store_true')
    parser.add_argument('--hub-revision', default=None)
    parser.add_argument('--data-dir', default=None,
                        help="re-estimate the sub-network's BN statistics on training images of this folder "
                             "(default: keep the full network's)")
    parser.add_argument('--train-split', default='train', help='split used with --data-dir')
    parser.add_argument('--bn-batches', type=cli_int, default=2, metavar='B',
                        help='training batches for the BN re-estimation with --data-dir (default 2; 0: off)')
    parser.add_argument('-b', '--batch-size', type=cli_int, default=128, help='batch size of the BN re-estimation')
    args = parser.parse_args(argv)
    return exit_code(lambda: _export(args, parser))


if __name__ == '__main__':
    sys.exit(main())
