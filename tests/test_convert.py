"""The authors' released ST++ checkpoints, offline: a synthetic official checkpoint built from their key
list (tests/data/official_resnet50_keys.json, a copy of the facts in the issue) with a distinct fill per
tensor converts, loads through timm's own loader (file, local HTTP URL, hf-hub cache) and lands every
tensor on the right timm key; unsafe or wrong input is refused in one line with nothing written."""
import dataclasses
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from typing import Dict, List, Tuple

import huggingface_hub
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import stim_timm
from stim_timm.cli.convert import main
from stim_timm.models import official
from stim_timm.models.official import (
    OfficialCheckpointError, Release, checkpoint_filter_fn, expects_normalized_logits, official_stage_depths, official_state_dict, official_to_timm,
)
from stim_timm.method.losses import official_probs

import clirun

KEYS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'official_resnet50_keys.json')
STATS = ('running_mean', 'running_var', 'num_batches_tracked')


def _official_names(depths: Tuple[int, ...]) -> List[str]:
    """The authors' key names in state_dict order, written from their naming scheme (see the issue)."""
    bn = ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    names = ['features.0.0.weight'] + [f'features.0.1.{p}' for p in bn]
    block = 1
    for n in depths:
        for i in range(n):
            for conv, norm in (('body.0', 'body.1'), ('body.3', 'body.4'), ('body.6', 'body.7')) + (
                    (('shortcut.0', 'shortcut.1'),) if i == 0 else ()):
                names += [f'features.{block}.{conv}.weight'] + [f'features.{block}.{norm}.{p}' for p in bn]
            block += 1
    return names + ['classifier.0.weight', 'classifier.0.bias']


def _filled(names: List[str], shapes: List[Tuple[int, ...]], dtype=torch.float32) -> 'OrderedDict[str, torch.Tensor]':
    """Tensor i holds the value i+1 everywhere: where it lands tells which official tensor it was."""
    return OrderedDict((k, torch.tensor(i + 1) if k.endswith('num_batches_tracked')
                        else torch.full(s, i + 1., dtype=dtype)) for i, (k, s) in enumerate(zip(names, shapes)))


def _raw_checkpoint(state_dict: Dict[str, torch.Tensor]) -> dict:
    """Their train.py's dict from a DataParallel model, with SGD momentum buffers."""
    params = [v for k, v in state_dict.items() if not k.endswith(STATS)]
    opt = {'state': {i: {'momentum_buffer': torch.full_like(p, -1.)} for i, p in enumerate(params)},
           'param_groups': [dict(lr=0.0, momentum=0.9, dampening=0, weight_decay=1e-4, nesterov=False, maximize=False,
                                 foreach=None, differentiable=False, fused=None, params=list(range(len(params))))]}
    return {'epoch': 199, 'state_dict': OrderedDict(('module.' + k, v) for k, v in state_dict.items()),
            'best_acc1': torch.tensor(80.496), 'best_acc5': torch.tensor(95.264), 'optimizer': opt}


def _assert_filled(state_dict: Dict[str, torch.Tensor], arch: str = 'resnet50') -> None:
    """Every tensor of timm's ``arch``, in timm's order, holds the fill of the official tensor at that position
    (their state_dict has the same order, the issue says); checked on every element."""
    ref = timm.create_model(arch).state_dict()
    assert set(state_dict) == set(ref)
    for i, key in enumerate(ref):
        v = state_dict[key]
        assert v.shape == ref[key].shape and v.dtype == ref[key].dtype, key
        assert torch.all(v == i + 1), f'{key} holds {v.flatten()[0]}, expected {i + 1}'


@pytest.fixture(scope='module')
def keys() -> 'OrderedDict[str, List[int]]':
    with open(KEYS_JSON) as f:
        return json.load(f, object_pairs_hook=OrderedDict)


@pytest.fixture(scope='module')
def ckpt(keys, tmp_path_factory) -> Dict[str, str]:
    """The raw .pth.tar (module. prefix, optimizer) and a cleaned bare state_dict of the same tensors."""
    folder = tmp_path_factory.mktemp('official')
    sd = _filled(list(keys), [tuple(s) for s in keys.values()])
    paths = dict(raw=str(folder / 'model_best.pth.tar'), clean=str(folder / 'clean.pth'))
    torch.save(_raw_checkpoint(sd), paths['raw'])
    torch.save(sd, paths['clean'])
    return paths


@pytest.fixture(scope='module')
def converted(ckpt, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp('conv') / 'resnet50.stpp_in1k')
    assert main([ckpt['raw'], out, '--model', 'stim_resnet50.stpp_in1k']) == 0
    return out


# ----------------------------------------------------------------------------------------- the mapping

def test_key_list_is_the_naming_scheme_and_timm_order(keys):
    ref = timm.create_model('resnet50').state_dict()
    assert len(keys) == 320 and list(keys) == _official_names((3, 4, 6, 3))
    assert [tuple(s) for s in keys.values()] == [tuple(v.shape) for v in ref.values()]


def test_every_official_tensor_lands_on_its_timm_key(ckpt):
    raw = torch.load(ckpt['raw'], weights_only=True)
    mapped = official_to_timm(official_state_dict(raw))
    _assert_filled(mapped)
    names = list(official_state_dict(raw))
    spot = {'features.0.0.weight': 'conv1.weight', 'features.0.1.running_var': 'bn1.running_var',
            'features.1.shortcut.0.weight': 'layer1.0.downsample.0.weight',
            'features.4.body.3.weight': 'layer2.0.conv2.weight', 'features.13.body.7.bias': 'layer3.5.bn3.bias',
            'features.16.body.4.num_batches_tracked': 'layer4.2.bn2.num_batches_tracked',
            'classifier.0.weight': 'fc.weight', 'classifier.0.bias': 'fc.bias'}
    for old, new in spot.items():
        assert int(mapped[new].flatten()[0]) == names.index(old) + 1, (old, new)


def test_filter_takes_raw_clean_and_timm_dicts(ckpt):
    model = timm.create_model('resnet50')
    raw = torch.load(ckpt['raw'], weights_only=True)
    clean = torch.load(ckpt['clean'], weights_only=True)
    for sd in (raw, clean, raw['state_dict']):
        _assert_filled(checkpoint_filter_fn(sd, model))
    timm_sd = model.state_dict()
    assert checkpoint_filter_fn(timm_sd, model) is timm_sd  # a converted file or a mirrored timm tag: unchanged
    with pytest.raises(OfficialCheckpointError, match=r'official ResNet-50 \(blocks per stage 3-4-6-3\) but the '
                                                      r'model has 3-4-23-3'):
        checkpoint_filter_fn(raw, timm.create_model('resnet101'))


@pytest.mark.parametrize('depth', [50, 101, 152])
def test_depth_from_keys(depth):
    names = _official_names(official.STAGE_DEPTHS[depth])
    assert official_stage_depths(names) == official.STAGE_DEPTHS[depth]
    assert official.official_depth(names) == depth


def test_unknown_or_partial_layouts_are_refused(keys):
    names = list(keys)
    sd = {k: torch.zeros(1) for k in names}
    with pytest.raises(OfficialCheckpointError, match=r"unknown key 'features.3.body.9.weight'"):
        official_to_timm({**sd, 'features.3.body.9.weight': torch.zeros(1)})
    with pytest.raises(OfficialCheckpointError, match='not numbered 1..N'):
        official_stage_depths([k for k in names if not k.startswith('features.13.')])
    renumbered = [k.replace('features.14.', 'features.13.').replace('features.15.', 'features.14.')
                  .replace('features.16.', 'features.15.') for k in names if not k.startswith('features.13.')]
    with pytest.raises(OfficialCheckpointError, match='blocks per stage 3-4-5-3 match no released depth'):
        official_stage_depths(renumbered)  # stage 3 one block short
    with pytest.raises(OfficialCheckpointError, match="entry 'epoch' is not a named tensor"):
        official_state_dict({'epoch': 3, 'conv1.weight': torch.zeros(1)})


# ------------------------------------------------------------------------------- timm's own loader

def test_tags_and_cfgs():
    assert timm.models.get_pretrained_cfg('stim_resnet50').tag == 'stpp_in1k'  # the default
    tags = timm.list_pretrained('stim_resnet50.*')
    assert {'stim_resnet50.stpp_in1k', 'stim_resnet50.stpp_ua_in1k', 'stim_resnet50.a1_in1k',
            'stim_resnet50.tv_in1k'} <= set(tags)
    assert timm.models.get_pretrained_cfg('stim_resnet50.a1_in1k').hf_hub_id == 'timm/resnet50.a1_in1k'
    urls = []
    for tag, run in (('stpp_in1k', 'ST_1_1_50_E200_2G_norm_Snet6_A1_T1_Dtrans7_vrs240_tcs200_space3'),
                     ('stpp_ua_in1k', 'ST_1_1_50_E400_2G_norm_Snet6_A1_T1_Dtrans7_vrs240_tcs200_space3_UA')):
        cfg = timm.models.get_pretrained_cfg(f'stim_resnet50.{tag}').to_dict()
        assert cfg['url'].startswith(f'https://github.com/Sunshine-Ye/NIPS22-ST/raw/main/{run}/')
        assert (cfg['crop_pct'], cfg['interpolation'], cfg['license'], cfg['paper_ids']) == (0.933, 'bilinear', 'mit',
                                                                                               'arXiv:2305.02507')
        assert cfg['origin_url'].startswith('https://github.com/Sunshine-Ye/NIPS22-ST') and 'hf_hub_id' not in cfg
        assert expects_normalized_logits(cfg)
        urls.append(cfg['url'])
    # torch's download cache is keyed by the file name: the two tags must not share one
    assert len({u.rsplit('/', 1)[1] for u in urls}) == 2
    assert not expects_normalized_logits(timm.models.get_pretrained_cfg('stim_resnet50.a1_in1k').to_dict())
    model = timm.create_model('stim_resnet50')
    tf = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    assert [type(t).__name__ for t in tf.transforms[:2]] == ['Resize', 'CenterCrop']
    assert tf.transforms[0].size == 240 and tf.transforms[0].interpolation.value == 'bilinear'
    assert tf.transforms[1].size == (224, 224)


@pytest.mark.parametrize('which', ['raw', 'clean'])
def test_pretrained_file(ckpt, which):
    model = timm.create_model('stim_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=ckpt[which]))
    assert model.pretrained_cfg['tag'] == 'stpp_in1k'
    _assert_filled(model.state_dict())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_pretrained_url_from_local_http_server(ckpt, tmp_path, monkeypatch):
    folder = os.path.dirname(ckpt['raw'])
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}/model_best.pth.tar'
        model = timm.create_model('stim_resnet50.stpp_ua_in1k', pretrained=True, pretrained_cfg_overlay=dict(url=url))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    _assert_filled(model.state_dict())
    assert os.listdir(tmp_path / 'torch' / 'hub' / 'checkpoints') == ['model_best.pth.tar']


def test_hf_hub_id_is_all_publishing_needs(converted, tmp_path):
    """The converted folder as a Hub repo (prepared cache, offline): an hf_hub_id in the cfg wins over the url."""
    rev = '0123456789abcdef0123456789abcdef01234567'
    repo = tmp_path / 'hub' / 'models--stim-timm--resnet50.stpp_in1k'
    (repo / 'snapshots' / rev).mkdir(parents=True)
    for name in os.listdir(converted):
        (repo / 'snapshots' / rev / name).write_bytes(open(os.path.join(converted, name), 'rb').read())
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(rev)
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    release = dataclasses.replace(official.RELEASES[0], hf_hub_id='stim-timm/resnet50.stpp_in1k')
    cfg = official.release_cfg(release)
    assert cfg['url'] == official.RELEASES[0].url  # the url stays; an offline GitHub download would fail
    model = timm.create_model('stim_resnet50', pretrained=True, pretrained_cfg=cfg, cache_dir=str(tmp_path / 'hub'))
    _assert_filled(model.state_dict())


def test_official_probs():
    logits = torch.randn(4, 1000) * 7 + 3
    probs = official_probs(logits)
    assert torch.allclose(probs, F.softmax(F.layer_norm(logits, (1000,), eps=1e-7), -1))
    assert torch.allclose(probs.sum(-1), torch.ones(4)) and torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.allclose(official_probs(logits * 5 - 2), probs, atol=1e-6)  # direction only, as trained
    assert not torch.allclose(probs, logits.softmax(-1), atol=1e-3)
    assert stim_timm.official_probs is official_probs


# ------------------------------------------------------------------------------------------ converter

def test_converted_folder(converted):
    assert sorted(os.listdir(converted)) == ['README.md', 'config.json', 'model.safetensors']
    _assert_filled(load_file(os.path.join(converted, 'model.safetensors')))
    with open(os.path.join(converted, 'config.json')) as f:
        config = json.load(f)
    cfg = config['pretrained_cfg']
    assert config['architecture'] == 'resnet50' and cfg['tag'] == 'stpp_in1k'
    assert (cfg['crop_pct'], cfg['interpolation'], cfg['license']) == (0.933, 'bilinear', 'mit')
    assert expects_normalized_logits(cfg) and 'url' not in cfg
    card = open(os.path.join(converted, 'README.md')).read()
    for text in ('license: mit', '80.496%', 'not measured by this conversion', 'layer_norm(logits',
                 'named by --model; the file is not byte-identical to the released one', 'model_best.pth.tar',
                 '200 epochs'):
        assert text in card, text
    data = huggingface_hub.ModelCard.load(os.path.join(converted, 'README.md')).data
    assert (data.library_name, data.license, data.datasets) == ('timm', 'mit', ['imagenet-1k'])
    (result,) = data.eval_results  # the reported top-1, with where it comes from
    assert (result.metric_type, result.metric_value, result.dataset_type) == ('accuracy', 80.496, 'imagenet-1k')
    assert result.source_url.startswith(official.OFFICIAL_REPO)


def test_converted_folder_loads_with_plain_timm(converted, tmp_path):
    script = (
        "import sys, timm, torch\n"
        f"m = timm.create_model('local-dir:{converted}', pretrained=True).eval()\n"
        "ref = timm.create_model('resnet50').state_dict()\n"
        "sd = m.state_dict()\n"
        "print(type(m).__name__, m.pretrained_cfg['architecture'], m.pretrained_cfg['crop_pct'],\n"
        "      all(bool(torch.all(sd[k] == i + 1)) for i, k in enumerate(ref)), 'stim_timm' in sys.modules)\n")
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('PYTHONPATH', None)
    res = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=180, env=env,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ['ResNet', 'resnet50', '0.933', 'True', 'False']


def test_convert_cli_output(ckpt, tmp_path, capsys):
    out = tmp_path / 'out'
    assert main([ckpt['clean'], str(out)]) == 0  # a bare state_dict, depth from the keys, no release named
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{ckpt['clean']}: official ResNet-50 (blocks per stage 3-4-6-3), 320 tensors -> timm resnet50"
    assert lines[1] == 'release: none, not identified as one of the released files'
    _assert_filled(load_file(str(out / 'model.safetensors')))
    cfg = json.load(open(out / 'config.json'))['pretrained_cfg']
    assert cfg['crop_pct'] == 0.875 and 'tag' not in cfg  # their code's default eval resize 256
    assert 'Reported accuracy' not in open(out / 'README.md').read()


def test_a_release_is_identified_by_its_bytes(ckpt, tmp_path, monkeypatch, capsys):
    res = subprocess.run(['git', 'hash-object', ckpt['raw']], capture_output=True, text=True, check=True)
    blob = official.git_blob_id(ckpt['raw'])
    assert blob == res.stdout.strip()
    fake = (Release('stpp_in1k', 'RUN', 'model_best.pth.tar', blob, 200, 80.496, 95.264, 'recipe'),
            official.RELEASES[1])
    monkeypatch.setattr(official, 'RELEASES', fake)
    assert main([ckpt['raw'], str(tmp_path / 'a')]) == 0
    assert 'release: stpp_in1k, byte-identical to the released file' in capsys.readouterr().out
    assert json.load(open(tmp_path / 'a' / 'config.json'))['pretrained_cfg']['crop_pct'] == 0.933
    assert main([ckpt['raw'], str(tmp_path / 'b'), '--model', 'stim_resnet50.stpp_ua_in1k']) == 2
    err = capsys.readouterr().err
    assert "--model says 'stpp_ua_in1k' but the file is byte-identical to the 'stpp_in1k' release" in err
    assert not (tmp_path / 'b').exists()


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')  # unpickling this would create the marker file


def test_pickle_that_runs_code_is_refused(keys, tmp_path, capsys):
    marker = tmp_path / 'pwned'
    sd = {'module.' + k: torch.zeros(1) for k in list(keys)[:3]}
    evil = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': sd, 'epoch': 1, 'payload': _Evil(str(marker))}, evil)
    assert not marker.exists()
    assert main([str(evil), str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f'error: {evil}: not a readable checkpoint')
    with pytest.raises(RuntimeError, match='weights_only=True blocked loading this checkpoint'):
        timm.create_model('stim_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    assert not marker.exists() and not (tmp_path / 'out').exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe load does run it
    assert marker.exists()


@pytest.fixture(scope='module')
def resnet101(tmp_path_factory) -> str:
    """An official ResNet-101 state_dict (half precision: only keys and shapes matter to the depth check)."""
    ref = timm.create_model('resnet101').state_dict()
    path = str(tmp_path_factory.mktemp('r101') / 'r101.pth.tar')
    names = _official_names((3, 4, 23, 3))
    torch.save({'state_dict': {'module.' + k: v for k, v in _filled(names, [v.shape for v in ref.values()],
                                                                      torch.float16).items()}}, path)
    return path


def test_resnet101_depth_is_inferred(resnet101, tmp_path, capsys):
    assert main([resnet101, str(tmp_path / 'out')]) == 0
    assert '(blocks per stage 3-4-23-3), 626 tensors -> timm resnet101' in capsys.readouterr().out
    sd = load_file(str(tmp_path / 'out' / 'model.safetensors'))
    ref = timm.create_model('resnet101').state_dict()
    assert all(bool(torch.all(sd[k] == i + 1)) for i, k in enumerate(ref))
    assert json.load(open(tmp_path / 'out' / 'config.json'))['architecture'] == 'resnet101'


def _bad_inputs(tmp_path, ckpt, resnet101, keys):
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    extra = tmp_path / 'extra.pth'
    sd = {k: torch.zeros(1) for k in keys}
    torch.save({'module.' + k: v for k, v in {**sd, 'features.3.body.9.weight': torch.zeros(1)}.items()}, extra)
    timm_file = tmp_path / 'timm.pth'
    torch.save({'state_dict': timm.create_model('resnet18').state_dict()}, timm_file)
    return {
        'missing': ([str(tmp_path / 'nope.pth.tar')], 'no such file'),
        'not_a_checkpoint': ([str(text)], 'not a readable checkpoint'),
        'wrong_depth': ([resnet101, '--model', 'stim_resnet50'],
                        'an official ResNet-101 (blocks per stage 3-4-23-3) but --model stim_resnet50 is a ResNet-50'),
        'unknown_key': ([str(extra)], "unknown key 'features.3.body.9.weight'"),
        'timm_keys': ([str(timm_file)], "not in the authors' layout (first key 'conv1.weight'"),
        'bad_model': ([ckpt['clean'], '--model', 'vit_base_patch16_224'], 'ResNet-50/101/152'),
        'bad_tag': ([ckpt['clean'], '--model', 'stim_resnet50.nope'], "no released checkpoint tagged 'nope'"),
        'release_depth': ([resnet101, '--model', 'stim_resnet101.stpp_in1k'], 'is a ResNet-50 release'),
        'bad_repo_id': ([ckpt['clean'], '--push-to-hub', 'a/b/c'], "invalid Hub repo id 'a/b/c'"),
    }


def test_bad_inputs_one_line_exit_2_nothing_written(ckpt, resnet101, keys, tmp_path, capsys):
    for case, (args, message) in _bad_inputs(tmp_path, ckpt, resnet101, keys).items():
        out = tmp_path / f'out-{case}'
        assert main([args[0], str(out)] + args[1:]) == 2, case
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and err.startswith('error: ') and message in err, (case, err)
        assert not out.exists() and captured.out == '', case


def test_cli_module_exit_code(tmp_path):
    """``python -m stim_timm.cli.convert`` (the module's own ``sys.exit(main())``), run in this process."""
    res = clirun.run_module('convert', [tmp_path / 'nope.pth.tar', tmp_path / 'o'], check=False)
    assert res.returncode == 2 and res.stderr == f"error: {tmp_path / 'nope.pth.tar'}: no such file\n"


def test_push_to_hub_uploads_the_folder(ckpt, tmp_path, monkeypatch, capsys):
    sent = {}

    def create_repo(api, repo_id, **kw):
        return huggingface_hub.hf_api.RepoUrl(f'https://huggingface.co/me/{repo_id}')  # the Hub adds the user

    def upload_folder(api, **kw):
        sent.update(kw, files=sorted(os.listdir(kw['folder_path'])),
                    card=open(os.path.join(kw['folder_path'], 'README.md')).read())
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc",
                                          commit_message='', commit_description='', oid='abc')

    monkeypatch.setenv('HF_TOKEN', 'hf_testtoken0123456789')
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
    args = [ckpt['raw'], str(tmp_path / 'out'), '--model', 'stim_resnet50.stpp_in1k', '--push-to-hub', 'stpp']
    assert main(args) == 0
    assert sent['repo_id'] == 'me/stpp' and sent['files'] == ['README.md', 'config.json', 'model.safetensors']
    assert "'hf-hub:me/stpp'" in sent['card'] and "'hf-hub:stpp'" not in sent['card']
    assert capsys.readouterr().out.splitlines()[-1] == 'pushed to https://huggingface.co/me/stpp/commit/abc'
