"""RunFolder's ownership and records, and the checkpoint saver's order (no training: milliseconds)."""
import argparse
import os
from pathlib import Path

import pytest
import torch

from stim_timm.run.checkpoint import CheckpointError, read_torch_checkpoint
from stim_timm.run.folder import RunFolder, sha256_file
from stim_timm.run.state import StimCheckpointSaver


def test_records_are_held_until_the_first_saved_epoch(tmp_path):
    folder = RunFolder(str(tmp_path))
    folder.hold_records(run_id='abc', classes=['a', 'b'])
    folder.write_args('model: x\n')
    assert os.listdir(tmp_path) == ['args.yaml']  # a run that saves nothing leaves no run.json
    folder.keep_records()
    records = RunFolder(str(tmp_path)).records()
    assert records['run_id'] == 'abc' and records['classes'] == ['a', 'b']
    assert records['files']['args.yaml'] == [sha256_file(str(tmp_path / 'args.yaml'))]
    assert RunFolder(str(tmp_path)).read_args() == {'model': 'x'}


def test_a_pending_replacement_accepts_both_files(tmp_path):
    folder = RunFolder(str(tmp_path))
    folder.hold_records(run_id='abc')
    folder.keep_records()
    (tmp_path / 'f').write_bytes(b'old')
    folder.settle('f', sha256_file(str(tmp_path / 'f')))
    (tmp_path / 'new').write_bytes(b'new')
    folder.expect('f', sha256_file(str(tmp_path / 'new')))  # a kill now: the old file still verifies
    folder.verify(str(tmp_path / 'f'))
    os.replace(tmp_path / 'new', tmp_path / 'f')  # a kill now: the new one verifies
    folder.verify(str(tmp_path / 'f'))
    folder.settle('f', sha256_file(str(tmp_path / 'f')))
    (tmp_path / 'f').write_bytes(b'old')
    with pytest.raises(CheckpointError, match=r'/f: its sha256 .* corrupt or was changed'):
        folder.verify(str(tmp_path / 'f'))


def test_a_folder_without_records_gets_none(tmp_path):
    folder = RunFolder(str(tmp_path))
    folder.append_summary({'epoch': 0})
    assert os.listdir(tmp_path) == ['summary.csv']


def test_held_message_and_output_problem(tmp_path):
    folder = RunFolder(str(tmp_path))
    assert folder.held_message() is None and folder.output_problem('--out') is None
    (tmp_path / '.tmp-x').write_bytes(b'')
    assert folder.output_problem('--out') is None  # a kill's temp file is no run
    (tmp_path / 'args.yaml').write_text('a: 1\n')
    assert folder.held_message() is None  # a run that saved no checkpoint holds nothing
    assert 'is a training run folder (args.yaml)' in folder.output_problem('--out')
    (tmp_path / 'checkpoint-3.pth.tar').write_bytes(b'x')
    assert f'add --resume {tmp_path / "checkpoint-3.pth.tar"}' in folder.held_message()


class _Task:
    """What the saver asks of a timm task."""

    def __init__(self):
        self.model = torch.nn.Linear(2, 2)

    def get_checkpoint_state(self, ema=False, unwrap_fn=None):
        return {} if ema else {'state_dict': self.model.state_dict()}


def test_the_numbered_checkpoint_exists_before_last_changes(tmp_path, monkeypatch):
    task = _Task()
    folder = RunFolder(str(tmp_path))
    folder.hold_records(run_id='r')
    folder.keep_records()
    saver = StimCheckpointSaver(model=task.model, optimizer=torch.optim.SGD(task.model.parameters(), lr=0.1),
                                args=argparse.Namespace(model='m'), checkpoint_dir=str(tmp_path),
                                recovery_dir=str(tmp_path), max_history=1, task=task, folder=folder,
                                extra={'run_id': 'r'})
    saver.save_checkpoint(0, metric=1.0)
    events = []
    real_replace, real_link, real_remove = os.replace, os.link, os.remove
    monkeypatch.setattr(os, 'replace', lambda a, b: (events.append(('replace', os.path.basename(b))),
                                                     real_replace(a, b)))
    monkeypatch.setattr(os, 'remove', lambda a: (events.append(('remove', os.path.basename(a))), real_remove(a)))
    saver.save_checkpoint(1, metric=2.0)  # better: evicts checkpoint-0
    monkeypatch.undo()
    order = [name for _, name in events if name.endswith('.pth.tar')]
    assert order.index('checkpoint-1.pth.tar') < order.index('last.pth.tar') < order.index('checkpoint-0.pth.tar')
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith('.pth.tar')) == [
        'checkpoint-1.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    for name in ('checkpoint-1.pth.tar', 'last.pth.tar', 'model_best.pth.tar'):
        ckpt = read_torch_checkpoint(str(tmp_path / name))  # verified against run.json
        assert ckpt['epoch'] == 1 and ckpt['run_id'] == 'r'
    assert 'checkpoint-0.pth.tar' not in folder.records()['files']
    saver.save_recovery(1, 3)
    saver.save_recovery(1, 5)
    saver.save_recovery(1, 7)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith('recovery')) == [
        'recovery-1-5.pth.tar', 'recovery-1-7.pth.tar']
    assert sorted(n for n in folder.records()['files'] if n.startswith('recovery')) == [
        'recovery-1-5.pth.tar', 'recovery-1-7.pth.tar']
    read_torch_checkpoint(str(tmp_path / 'recovery-1-7.pth.tar'))
