"""Selection state: nesting, out-of-order exits, threads, DataParallel replicas, copies."""
import copy
import pickle
import threading

import pytest
import timm
import torch

import stim_timm


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny tensors: one intra-op thread (two threads on a loaded 2-core machine wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model():
    torch.manual_seed(0)
    return timm.create_model('stim_resnet20_cifar', zero_init_last=False, num_classes=4).eval()


X = torch.randn(1, 3, 16, 16)


def test_nesting_restores_and_out_of_order_exit_is_correct():
    m = model()
    full = m(X)
    with m.subnet((1, 1, 1)):
        small = m(X)
        with m.subnet((2, 2, 2)):
            assert m.current_subnet == (2, 2, 2)
        assert m.current_subnet == (1, 1, 1) and torch.equal(m(X), small)
    a, b = m.subnet((1, 1, 1)), m.subnet((2, 2, 2))
    a.__enter__()
    b.__enter__()
    with m.subnet((2, 2, 2)):
        mid = m(X)
    a.__exit__(None, None, None)  # out of order: b is still open, so (2, 2, 2) stays active
    assert m.current_subnet == (2, 2, 2) and torch.equal(m(X), mid)
    b.__exit__(None, None, None)
    assert m.current_subnet is None and torch.equal(m(X), full)  # nothing stuck


def test_set_subnet_is_the_default_under_contexts():
    m = model()
    m.set_subnet((2, 2, 2))
    with m.subnet(None):
        assert m.current_subnet is None
    assert m.current_subnet == (2, 2, 2)
    m.set_subnet(None)


def test_a_context_in_one_thread_never_changes_a_forward_in_another():
    m = model()
    full, entered, done = m(X), threading.Event(), threading.Event()
    seen = {}

    def other():
        entered.wait()
        seen['y'] = m(X)
        seen['skipped'] = sum(1 for _ in m.skipped_parameters())
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with m.subnet((1, 1, 1)):
        entered.set()
        done.wait(30)
        small = m(X)
    t.join()
    assert torch.equal(seen['y'], full) and seen['skipped'] == 0
    assert not torch.equal(small, full)


def test_exit_in_another_thread_is_a_one_line_error():
    m = model()
    ctx = m.subnet((1, 1, 1))
    ctx.__enter__()
    errors = []

    def other():
        try:
            ctx.__exit__(None, None, None)
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors and 'exited in another thread' in errors[0] and '\n' not in errors[0]


def replicate_on_cpu(network):
    """torch.nn.parallel.replicate for one CPU replica: every module's _replicate_for_data_parallel()
    (a __dict__ copy), children relinked to the copies, parameters and buffers copied (as broadcast does)."""
    modules = list(network.modules())
    copies = {id(mod): mod._replicate_for_data_parallel() for mod in modules}
    for mod in modules:
        replica = copies[id(mod)]
        for key, child in mod._modules.items():
            replica._modules[key] = None if child is None else copies[id(child)]
        for key, p in mod._parameters.items():
            replica._parameters[key] = None if p is None else p.detach().clone()
        for key, b in mod._buffers.items():
            replica._buffers[key] = None if b is None else b.clone()
    return copies[id(network)]


def test_data_parallel_replicas_run_their_own_blocks():
    """What torch.nn.parallel.replicate does, on CPU: replicas copy __dict__ (_replicate_for_data_parallel)."""
    m = model()
    with torch.no_grad():
        with m.subnet((2, 1, 3)):
            expected = m(X)
            replica = replicate_on_cpu(m)
        assert replica.layer1[0].forward.args[0] is replica.layer1[0]
        assert replica.layer1[0] is not m.layer1[0]
        result = {}
        t = threading.Thread(target=lambda: result.setdefault('y', replica(X)))  # DataParallel's worker thread
        t.start()
        t.join()
        torch.testing.assert_close(result['y'], expected, rtol=0, atol=0)  # the selection made at replicate time
        for p in m.parameters():  # the original changes; the replica's own weights do not
            p.add_(1.0)
        assert torch.equal(replica(X), expected)
        assert replica.subnet.args[0] is replica and replica.current_subnet == (2, 1, 3)


def test_copies_pickle_and_ema_keep_their_own_switches(tmp_path):
    m = model()
    with m.subnet((1, 1, 1)):
        small = m(X)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert other.layer1[2].stim_board is other.stim_board is not m.stim_board
        with other.subnet((1, 1, 1)):
            assert torch.equal(other(X), small)
            assert not torch.equal(m(X), small)  # the original's selection is its own
    ema = timm.utils.ModelEmaV3(m, decay=0.5)
    with ema.module.subnet((1, 1, 1)):
        assert torch.equal(ema.module(X), small)
    ema.update(m)
    torch.save(m, tmp_path / 'm.pt')
    loaded = torch.load(tmp_path / 'm.pt', weights_only=False)
    with loaded.subnet((1, 1, 1)):
        assert torch.equal(loaded(X), small)


def test_bad_depths_in_a_context_leave_nothing_open():
    m = model()
    with pytest.raises(ValueError, match='stage 0 keeps 0 blocks'):
        with m.subnet((0, 1, 1)):
            pass
    assert m.current_subnet is None and torch.equal(m(X), model()(X))
