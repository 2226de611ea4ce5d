"""``stim-push``: publish a trained checkpoint to the Hugging Face Hub, loadable with plain timm.

    stim-push push CHECKPOINT REPO_ID [--private] [--revision R] [--commit-message M]
    stim-push build CHECKPOINT OUT_DIR      # the folder push would upload, not uploaded
"""
import os
import sys
from typing import Optional, Sequence

from ..publish.hub import build_hub_folder, push_checkpoint, validate_hub_repo_id
from ..run.io import OneLineParser, exit_code
from .checks import check_out, check_sources
from .preflight import check_hub

__all__ = ['main']


def _run(args) -> None:
    check_sources([args.checkpoint])  # every value before the checkpoint is read or a file written
    if args.command == 'push':
        check_hub(args.repo_id, 'REPO_ID', offline=False)
        url = push_checkpoint(args.checkpoint, args.repo_id, args.private, args.revision, args.commit_message)
        print(f'pushed {args.checkpoint} to {url}')
    else:
        if args.repo_id is not None:
            validate_hub_repo_id(args.repo_id)
        check_out(args.out_dir, 'OUT_DIR')
        out = build_hub_folder(args.checkpoint, args.out_dir, args.repo_id)
        print(f'wrote {", ".join(sorted(os.listdir(out)))} to {out}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(prog='stim-push', prefix='',
                           description='Publish stim-timm checkpoints to the Hugging Face Hub.')
    sub = parser.add_subparsers(dest='command', required=True)
    push = sub.add_parser('push', prefix='', help='upload a checkpoint (token from HF_TOKEN or `hf auth login`)')
    push.add_argument('checkpoint', help='train_stim.py output folder, .pth(.tar) or .safetensors')
    push.add_argument('repo_id', help='ORG/NAME')
    push.add_argument('--private', action='store_true', help='create the repo private')
    push.add_argument('--revision', default=None, help='branch to push to (created if missing)')
    push.add_argument('--commit-message', default=None)
    build = sub.add_parser('build', prefix='', help='write the folder that push would upload, without uploading')
    build.add_argument('checkpoint')
    build.add_argument('out_dir')
    build.add_argument('--repo-id', default=None, help='repo id used in the card usage lines')
    args = parser.parse_args(argv)
    return exit_code(lambda: _run(args))


if __name__ == '__main__':
    sys.exit(main())
