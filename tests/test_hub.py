"""Hub publishing, offline: the uploaded folder file by file, loading it back with plain timm (local-dir and
hf-hub from a prepared cache), and the upload with the Hub client replaced at its network boundary."""
import argparse
import hashlib
import inspect
import json
import os
import subprocess
import sys
from typing import Optional

import huggingface_hub
import pytest
import timm
import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file

from stim_timm.run.checkpoint import atomic_save_safetensors
from stim_timm.publish.hub import HubError, build_hub_folder, push_checkpoint
from stim_timm.cli.push import main

TOKEN = 'hf_testSECRETtoken0123456789'
SUMMARY = ('epoch,train_loss,train_kl_loss,lr,eval_loss,eval_top1,eval_top5,subnet_4_top1,'
           'subnet_8_top1,subnet_11_top1\n'
           '0,2.1,0.3,0.1,1.9,30.5,80.1,12.0,25.0,29.0\n'
           '1,1.8,0.2,0.1,1.6,41.5,88.25,20.0,38.0,40.75\n'
           '2,1.7,0.2,0.1,1.7,40.0,87.0,22.0,37.0,39.0\n')


def _sha_tree(folder) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), 'rb') as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _make_run(folder, name: str = 'stim_vit_tiny_patch16_224', input_size=(3, 32, 32), pth: bool = True):
    """A train_stim.py-like run folder: model.safetensors, last.pth.tar, args.yaml, summary.csv."""
    os.makedirs(folder, exist_ok=True)
    model = timm.create_model(name, num_classes=10).eval()
    for m in model.modules():  # non-default BN statistics must travel too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    atomic_save_safetensors(model.state_dict(), os.path.join(folder, 'model.safetensors'),
                            metadata=dict(arch=name, num_classes='10'))
    args = dict(model=name, num_classes=10, stim=True, stim_pp=True, stim_rule='stpp', stim_subnets=2,
                stim_kl_minus=True, stim_small_input=0.43, epochs=3, dataset='torch/cifar10',
                data_dir='/data/cifar10', eval_metric='top1', input_size=list(input_size), mean=None, std=None)
    with open(os.path.join(folder, 'args.yaml'), 'w') as f:
        yaml.safe_dump(args, f)
    with open(os.path.join(folder, 'summary.csv'), 'w') as f:
        f.write(SUMMARY if name.startswith('stim_vit') else SUMMARY.replace('subnet_4_', 'subnet_1-1-1_')
                .replace('subnet_8_', 'subnet_3-2-3_').replace('subnet_11_', 'subnet_3-3-2_'))
    if pth:
        torch.save({'state_dict': model.state_dict(), 'arch': name, 'epoch': 2,
                    'args': argparse.Namespace(**args)}, os.path.join(folder, 'last.pth.tar'))
    return str(folder), model


@pytest.fixture(scope='module')
def vit_run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp('runs') / 'vit-stpp')


@pytest.fixture(scope='module')
def vit_folder(vit_run, tmp_path_factory):
    out = tmp_path_factory.mktemp('hub') / 'folder'
    build_hub_folder(vit_run[0], str(out), repo_id='me/vit-stpp')
    return str(out)


class FakeHub:
    """Replaces HfApi's network methods; records what would have been sent."""

    def __init__(self, fail: Optional[Exception] = None, fail_at: str = 'create_repo'):
        self.calls = []
        self.files = {}
        self.fail, self.fail_at = fail, fail_at

    def install(self, monkeypatch):
        fake = self

        def create_repo(api, repo_id, **kw):
            fake._record('create_repo', repo_id=repo_id, token=api.token, **kw)
            full = repo_id if '/' in repo_id else f'me/{repo_id}'  # the Hub adds the user's namespace
            return huggingface_hub.hf_api.RepoUrl(f'https://huggingface.co/{full}')

        def create_branch(api, repo_id, **kw):
            fake._record('create_branch', repo_id=repo_id, **kw)

        def upload_folder(api, **kw):
            fake._record('upload_folder', **kw)
            fake.files = _sha_tree(kw['folder_path'])
            fake.card = open(os.path.join(kw['folder_path'], 'README.md')).read()
            return huggingface_hub.CommitInfo(
                commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc123", commit_message=kw['commit_message'],
                commit_description='', oid='abc123')

        for name, fn in (('create_repo', create_repo), ('create_branch', create_branch),
                         ('upload_folder', upload_folder), ('create_commit', self._forbidden),
                         ('file_exists', self._forbidden)):
            monkeypatch.setattr(huggingface_hub.HfApi, name, fn)
        return self

    def _record(self, name, **kw):
        self.calls.append((name, kw))
        if self.fail is not None and name == self.fail_at:
            raise self.fail

    @staticmethod
    def _forbidden(*a, **k):
        raise AssertionError('unexpected Hub call')

    def named(self, name):
        return [kw for n, kw in self.calls if n == name]


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    return TOKEN


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'no-tokens'))


# ------------------------------------------------------------------------------------------ the folder

def test_folder_files_and_config(vit_run, vit_folder):
    run, model = vit_run
    assert sorted(os.listdir(vit_folder)) == ['README.md', 'config.json', 'loafing.png', 'model.safetensors']
    cfg = json.loads(open(os.path.join(vit_folder, 'config.json')).read())
    assert cfg['architecture'] == 'vit_tiny_patch16_224'  # the base timm architecture, not stim_*
    assert cfg['num_classes'] == 10 and cfg['model_args']['num_classes'] == 10
    assert cfg['model_args']['depth'] == 12 and cfg['model_args']['dynamic_img_size'] is True
    pc = cfg['pretrained_cfg']
    assert pc['input_size'] == [3, 32, 32]  # the training run's input size
    assert pc['mean'] == [0.5, 0.5, 0.5] and pc['std'] == [0.5, 0.5, 0.5] and pc['num_classes'] == 10
    assert not {'hf_hub_id', 'url', 'tag', 'file', 'architecture'} & set(pc)  # no stale provenance
    sd = load_file(os.path.join(vit_folder, 'model.safetensors'))
    ref = model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    png = open(os.path.join(vit_folder, 'loafing.png'), 'rb').read()
    assert png.startswith(b'\x89PNG') and len(png) < 200_000


def test_model_card(vit_folder):
    card = open(os.path.join(vit_folder, 'README.md')).read()
    assert card.startswith('---\n') and 'library_name: timm' in card
    for text in ('ST++', '**Sub-network sampling rule:** stpp', '**Sub-networks per step (k):** 2', '**KL- loss:** yes',
                 '(min scale):** 0.43', '**Epochs:** 3', '**Dataset:** torch/cifar10',
                 'epoch 1 (best epoch by eval_top1)', '**41.50%**', 'top-5 88.25%',
                 '| 12 (full) | 12 | 1.000 | 41.50 | 88.25 |', '| 11 | 11 |', '| 4 | 4 |',
                 '![top-1 against relative FLOPs of the sub-networks](loafing.png)',
                 "timm.create_model('hf-hub:me/vit-stpp', pretrained=True)", 'stim_timm.export_subnet'):
        assert text in card, text
    assert '/data/cifar10' not in card  # no local paths published
    assert 'import stim_timm' not in card.split('Sub-networks (shallower')[0]  # plain timm suffices


def test_folder_from_a_checkpoint_file_reports_its_epoch(vit_run, tmp_path):
    out = build_hub_folder(os.path.join(vit_run[0], 'last.pth.tar'), str(tmp_path / 'f'))
    card = open(os.path.join(out, 'README.md')).read()
    assert 'epoch 2 (last epoch)' in card and '**40.00%**' in card and "'hf-hub:REPO_ID'" in card


def test_folder_loads_back_with_plain_timm(vit_run, vit_folder, tmp_path):
    """local-dir: and hf-hub: (prepared cache, HF_HUB_OFFLINE=1) in a process that never imports stim_timm."""
    _, model = vit_run
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.save({'x': x, 'ref': model(x)}, tmp_path / 'io.pt')
    rev = '0123456789abcdef0123456789abcdef01234567'
    repo = tmp_path / 'hf' / 'hub' / 'models--me--vit-stpp'
    snap = repo / 'snapshots' / rev
    snap.mkdir(parents=True)
    for name in os.listdir(vit_folder):
        (snap / name).write_bytes(open(os.path.join(vit_folder, name), 'rb').read())
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(rev)
    script = (
        "import sys, timm, torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "for src in (" + repr(f'local-dir:{vit_folder}') + ", 'hf-hub:me/vit-stpp'):\n"
        "    m = timm.create_model(src, pretrained=True).eval()\n"
        "    with torch.no_grad(): y = m(io['x'])\n"
        "    print(type(m).__name__, m.pretrained_cfg['architecture'], torch.equal(y, io['ref']))\n"
        "assert 'stim_timm' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), HF_HUB_CACHE=str(tmp_path / 'hf' / 'hub'),
               OMP_NUM_THREADS=str(torch.get_num_threads()))  # same kernels: bitwise-equal outputs
    res = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines() == ['VisionTransformer vit_tiny_patch16_224 True'] * 2


def test_cifar_resnet_folder_names_the_plugin_architecture(tmp_path):
    run, model = _make_run(tmp_path / 'r20', 'stim_resnet20_cifar', pth=False)
    out = build_hub_folder(run, str(tmp_path / 'f'), repo_id='me/r20')
    cfg = json.loads(open(os.path.join(out, 'config.json')).read())
    assert cfg['architecture'] == 'resnet20_cifar'  # stim-timm's own architecture: timm's ResNet has no 3x3 stem
    card = open(os.path.join(out, 'README.md')).read()
    assert 'import stim_timm' in card and '| 3-3-2 | 8 |' in card
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()  # plugin imported here
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_card_prefers_a_saved_analysis(tmp_path):
    from stim_timm.cli.analyze import write_results
    run, _ = _make_run(tmp_path / 'r20', 'stim_resnet20_cifar', pth=False)
    path = os.path.join(os.path.abspath(run), 'model.safetensors')
    rows = [dict(checkpoint='r20', model='stim_resnet20_cifar', depths=d, blocks_kept=sum(d), total_blocks=9,
                 rel_flops=f, gflops=0.1, top1=t1, top5=99.0, is_full=d == [3, 3, 3], images=200,
                 bn='full-network', path=path)
            for d, f, t1 in (([3, 3, 3], 1.0, 91.5), ([2, 1, 2], 0.6, 88.25), ([1, 1, 1], 0.3, 80.0))]
    write_results(rows, os.path.join(run, 'analysis'))
    card = open(os.path.join(build_hub_folder(run, str(tmp_path / 'f')), 'README.md')).read()
    assert 'stim-analyze' in card and '| 2-1-2 | 5 | 0.600 | 88.25 | 99.00 |' in card


# ------------------------------------------------------------------------------------------ the upload

def test_push_sends_the_built_folder(vit_run, vit_folder, token, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    before = _sha_tree(vit_run[0])
    url = push_checkpoint(vit_run[0], 'me/vit-stpp', private=True, revision='exp-1', commit_message='ST++ run')
    assert url == 'https://huggingface.co/me/vit-stpp/commit/abc123'
    (create,), (branch,), (upload,) = hub.named('create_repo'), hub.named('create_branch'), hub.named('upload_folder')
    assert create['repo_id'] == 'me/vit-stpp' and create['private'] is True and create['exist_ok'] is True
    assert create['token'] == TOKEN  # from HF_TOKEN, via huggingface_hub's own lookup
    assert branch == dict(repo_id='me/vit-stpp', branch='exp-1', exist_ok=True)
    assert upload['repo_id'] == 'me/vit-stpp' and upload['revision'] == 'exp-1'
    assert upload['commit_message'] == 'ST++ run'
    built = _sha_tree(vit_folder)
    assert hub.files.keys() == built.keys()
    for name in ('model.safetensors', 'config.json', 'README.md'):  # byte for byte what build_hub_folder writes
        assert hub.files[name] == built[name], name
    assert _sha_tree(vit_run[0]) == before


def test_push_defaults(vit_run, token, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    push_checkpoint(vit_run[0], 'me/vit-stpp')
    assert hub.named('create_repo')[0]['private'] is False and not hub.named('create_branch')
    upload = hub.named('upload_folder')[0]
    assert upload['revision'] is None and upload['commit_message'] == 'Add vit-stpp (stim-timm)'


def test_push_without_namespace_fixes_the_card(vit_run, token, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    url = push_checkpoint(vit_run[0], 'vit-stpp')
    assert hub.named('create_repo')[0]['repo_id'] == 'vit-stpp' and hub.named('upload_folder')[0]['repo_id'] == 'me/vit-stpp'
    assert "'hf-hub:me/vit-stpp'" in hub.card and "'hf-hub:vit-stpp'" not in hub.card
    assert url.startswith('https://huggingface.co/me/vit-stpp/')


def test_push_signature_for_train_script():
    params = inspect.signature(push_checkpoint).parameters
    assert list(params) == ['checkpoint', 'repo_id', 'private', 'revision', 'commit_message']
    assert [params[p].default for p in ('private', 'revision', 'commit_message')] == [False, None, None]
    assert issubclass(HubError, ValueError)


def test_missing_token(vit_run, no_token, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    with pytest.raises(HubError, match='no Hugging Face token') as e:
        push_checkpoint(vit_run[0], 'me/vit-stpp')
    assert '\n' not in str(e.value) and hub.calls == []


@pytest.mark.parametrize('repo_id', ['me/has space', 'a/b/c', 'me/--bad--', ''])
def test_invalid_repo_id_before_any_network_call(vit_run, token, monkeypatch, repo_id):
    hub = FakeHub().install(monkeypatch)
    with pytest.raises(HubError, match='invalid Hub repo id') as e:
        push_checkpoint(vit_run[0], repo_id)
    assert '\n' not in str(e.value) and hub.calls == []


def _http_401():
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    resp = httpx2.Response(401, request=httpx2.Request('POST', 'https://huggingface.co/api/repos/create'))
    return HfHubHTTPError(f'401 Client Error: Unauthorized (token {TOKEN})\nmore detail', response=resp)


@pytest.mark.parametrize('fail_at,error', [
    ('create_repo', ConnectionError('[Errno 111] Connection refused')),
    ('upload_folder', TimeoutError('timed out')),
    ('create_repo', 'http-401'),
])
def test_network_failure_is_one_line(vit_run, token, monkeypatch, fail_at, error):
    error = _http_401() if error == 'http-401' else error
    FakeHub(fail=error, fail_at=fail_at).install(monkeypatch)
    before = _sha_tree(vit_run[0])
    with pytest.raises(HubError, match='push to me/vit-stpp failed') as e:
        push_checkpoint(vit_run[0], 'me/vit-stpp')
    assert '\n' not in str(e.value) and TOKEN not in str(e.value)
    assert _sha_tree(vit_run[0]) == before


def test_unreadable_checkpoint_is_a_hub_error(tmp_path, token, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    with pytest.raises(HubError, match='no such checkpoint'):
        push_checkpoint(str(tmp_path / 'missing'), 'me/x')
    assert hub.calls == []


@pytest.mark.parametrize('case', ['no-token', 'bad-id', 'network', 'missing-checkpoint'])
def test_cli_errors(vit_run, tmp_path, monkeypatch, capsys, case):
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    if case == 'no-token':
        monkeypatch.delenv('HF_TOKEN')
        monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'none'))
        monkeypatch.setattr(huggingface_hub.constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'none2'))
    FakeHub(fail=ConnectionError(f'refused {TOKEN}') if case == 'network' else None).install(monkeypatch)
    ckpt = str(tmp_path / 'missing') if case == 'missing-checkpoint' else vit_run[0]
    repo = 'not a/valid id' if case == 'bad-id' else 'me/vit-stpp'
    before = _sha_tree(vit_run[0])
    assert main(['push', ckpt, repo]) == 2
    out, err = capsys.readouterr()
    assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err
    assert TOKEN not in out + err
    assert _sha_tree(vit_run[0]) == before


def test_cli_push_and_build(vit_run, token, monkeypatch, capsys, tmp_path):
    hub = FakeHub().install(monkeypatch)
    assert main(['push', vit_run[0], 'me/vit-stpp', '--private', '--revision', 'r1', '--commit-message', 'm']) == 0
    assert hub.named('upload_folder')[0]['revision'] == 'r1' and hub.named('create_repo')[0]['private'] is True
    assert main(['build', vit_run[0], str(tmp_path / 'b')]) == 0
    out = capsys.readouterr().out
    assert 'commit/abc123' in out and TOKEN not in out
    assert sorted(os.listdir(tmp_path / 'b')) == ['README.md', 'config.json', 'loafing.png', 'model.safetensors']


def test_card_recipe_is_what_training_resolves():
    """One place (method.presets): the card's recipe lines and StimTask's arguments come from the same
    resolution of the flags, so they cannot drift apart."""
    from stim_timm.cli.train_args import parse_args, stim_options
    from stim_timm.method.presets import describe_stim, resolve_stim
    assert dict(describe_stim(dict(stim=False, stim_pp=False, epochs=3))) == {
        'Training': 'baseline (no stimulative training)'}
    assert dict(describe_stim({})) == {'Training': 'not recorded'}
    pp = dict(describe_stim(dict(stim_pp=True, stim_rule=None, stim_subnets=None, stim_small_input=None)))
    assert pp == {'Training': 'ST++ (preset stpp)', 'Sub-network sampling rule': 'stpp', 'Sub-networks per step (k)': 1,
                  'KL- loss': 'yes', 'Small sub-network inputs (min scale)': 0.43}
    st = dict(describe_stim(dict(stim=True, stim_subnets=3)))
    assert st['Sub-network sampling rule'] == 'uniform' and st['KL- loss'] == 'no' and st['Sub-networks per step (k)'] == 3
    for flags in ([], ['--stim'], ['--stim-pp'], ['--stim-kl-minus', '--stim-subnets', '4'],
                  ['--stim-pp', '--stim-rule', 'uniform', '--stim-small-input', '0.6'], ['--stim-subnets', '2']):
        args, _ = parse_args(['data'] + flags)
        opts = stim_options(args)
        assert opts == resolve_stim(vars(args)) == resolve_stim(yaml.safe_load(yaml.safe_dump(vars(args))))
        card = dict(describe_stim(vars(args)))
        if not opts['num_subnets']:
            assert card == {'Training': 'baseline (no stimulative training)'}
            continue
        small = opts['small_input']
        assert card['Sub-network sampling rule'] == opts['rule'] and card['Sub-networks per step (k)'] == \
            opts['num_subnets'] and card['KL- loss'] == ('yes' if opts['kl_minus'] else 'no')
        assert card['Small sub-network inputs (min scale)'] == ('no' if small is None else small)


def test_card_metadata_parses_back(vit_folder):
    card = huggingface_hub.ModelCard.load(os.path.join(vit_folder, 'README.md'))
    assert card.data.library_name == 'timm' and card.data.license == 'apache-2.0'
    assert {'image-classification', 'timm', 'stimulative-training', 'stim-timm'} <= set(card.data.tags)
    (result,) = card.data.eval_results
    assert (result.task_type, result.metric_type, result.dataset_type) == ('image-classification', 'accuracy',
                                                                           'torch/cifar10')
    assert result.metric_value == 41.5 and card.data.model_name == 'vit-stpp'
