"""``stim-convert``: the ST/ST++ authors' ImageNet checkpoint as a timm folder (optionally pushed).

    stim-convert THEIR.pth.tar OUT_DIR [--model stim_resnet50.stpp_in1k] [--push-to-hub ORG/NAME]
"""
import sys
from typing import Optional, Sequence

from ..models.official import STAGE_DEPTHS
from ..publish.convert import convert
from ..run.io import OneLineParser, exit_code, file_error
from .checks import check_out
from .preflight import check_hub

__all__ = ['main']


def _convert(args) -> None:
    why = file_error(args.src)  # every value before the (large) checkpoint is read or a file written
    if why:
        raise ValueError(f'{args.src}: {why}')
    check_out(args.out_dir, 'OUT_DIR')
    if args.push_to_hub:
        check_hub(args.push_to_hub, '--push-to-hub', offline=False)
    c = convert(args.src, args.out_dir, args.model, args.push_to_hub)
    depths = '-'.join(map(str, STAGE_DEPTHS[c.depth]))
    print(f'{args.src}: official ResNet-{c.depth} (blocks per stage {depths}), '
          f'{len(c.model.state_dict())} tensors -> timm {c.arch}')
    print(f"release: {c.release.tag if c.release else 'none'}, {c.how}")
    print(f'wrote model.safetensors, config.json, README.md to {args.out_dir}')
    print(f"load with plain timm: timm.create_model('local-dir:{args.out_dir}', pretrained=True)")
    if args.push_to_hub:
        print(f'pushed to {c.commit_url}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(prog='stim-convert', prefix='',
                           description="Convert the ST/ST++ authors' ImageNet checkpoint to a timm folder.")
    parser.add_argument('src', help="their .pth.tar (or a bare state_dict), e.g. model_best.pth.tar")
    parser.add_argument('out_dir', help='folder for model.safetensors, config.json, README.md')
    parser.add_argument('--model', default=None,
                        help='stim_resnet50 / stim_resnet101 / stim_resnet152, optionally with the release tag '
                             '(stim_resnet50.stpp_in1k); default: the depth read from the keys')
    parser.add_argument('--push-to-hub', default=None, metavar='REPO_ID', help='then upload OUT_DIR to ORG/NAME')
    args = parser.parse_args(argv)
    return exit_code(lambda: _convert(args))


if __name__ == '__main__':
    sys.exit(main())
