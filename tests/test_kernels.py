"""Kernels against plain numpy references, with the JIT on and off, and the CUDA twins on a GPU."""
import numpy as np
import pytest
import torch
from scipy import stats

from ecvl_fast import EcvlError
from ecvl_fast.kernels import cpu
from ecvl_fast.kernels.bank import MomentumBank

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device")


def ref_epoch(ema, seen, batches, beta):
    """eq. 8 by hand: mean loss per sample this epoch, then EMA (first observation initialises)."""
    ema, seen = ema.astype(np.float64).copy(), seen.copy()
    per = {}
    for idx, loss in batches:
        for i, v in zip(idx, loss):
            per.setdefault(int(i), []).append(float(v))
    for i, vals in per.items():
        lt = np.mean(vals)
        ema[i] = beta * ema[i] + (1 - beta) * lt if seen[i] else lt
        seen[i] = 1
    return ema, seen


def ref_normalise(ema, seen):
    """eq. 9, BCL's form, written the long way with the std."""
    m = np.zeros(len(ema))
    v = ema[seen.astype(bool)].astype(np.float64)
    if len(v) == 0:
        return m
    std = v.std()
    if std == 0:
        m[seen.astype(bool)] = 0.5
        return m
    z = (v - v.mean()) / std
    m[seen.astype(bool)] = z / np.abs(z).max() / 2 + 0.5
    return m


def run_cpu(n, batches, beta, epochs, jit):
    k = (lambda f: f) if jit else (lambda f: f.py_func)
    s, c = np.zeros(n, np.float32), np.zeros(n, np.int32)
    ema, seen, m = np.zeros(n, np.float32), np.zeros(n, np.uint8), np.zeros(n, np.float32)
    for _ in range(epochs):
        for idx, loss in batches:
            k(cpu.accumulate)(s, c, idx, loss)
        assert k(cpu.first_nonfinite)(s, c) == -1
        k(cpu.end_epoch)(ema, seen, s, c, beta)
        k(cpu.normalise)(ema, seen, m)
    return ema, seen, m


def random_batches(rng, n, n_batches, size, coverage=1.0):
    pool = rng.choice(n, size=max(1, int(n * coverage)), replace=False)
    return [(rng.choice(pool, size=size).astype(np.int64), rng.gamma(2.0, 1.0, size).astype(np.float32))
            for _ in range(n_batches)]


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize("case", ["random", "n1", "equal", "unseen"])
def test_momentum_matches_numpy(jit, case):
    rng = np.random.default_rng(7)
    n, beta = {"n1": 1}.get(case, 200), 0.97
    if case == "equal":
        batches = [(np.arange(n, dtype=np.int64), np.full(n, 1.5, np.float32))]
    elif case == "n1":
        batches = [(np.zeros(3, np.int64), np.array([1.0, 2.0, 4.0], np.float32))]
    else:
        batches = random_batches(rng, n, 6, 64, coverage=0.5 if case == "unseen" else 1.0)
    ema, seen, m = run_cpu(n, batches, beta, epochs=3, jit=jit)
    r_ema, r_seen = np.zeros(n), np.zeros(n, np.uint8)
    for _ in range(3):
        r_ema, r_seen = ref_epoch(r_ema, r_seen, batches, beta)
    np.testing.assert_allclose(ema, r_ema, rtol=1e-5)
    np.testing.assert_array_equal(seen, r_seen)
    np.testing.assert_allclose(m, ref_normalise(r_ema, r_seen), atol=1e-5)
    assert m.min() >= 0 and m.max() <= 1
    if case == "equal" or case == "n1":
        assert np.all(m[seen == 1] == 0.5)
    if case == "unseen":
        assert np.all(m[seen == 0] == 0) and (seen == 0).any()
    if case == "random":
        assert abs(m.mean() - 0.5) < 0.25 and np.isclose(np.abs(m - 0.5).max(), 0.5)


def test_unseen_samples_keep_their_ema():
    bank = MomentumBank(4, beta=0.5)
    bank.record(torch.tensor([0, 1]), torch.tensor([2.0, 4.0]))
    bank.end_epoch()
    bank.record(torch.tensor([0]), torch.tensor([6.0]))
    bank.end_epoch()
    assert bank.ema.tolist() == [4.0, 4.0, 0.0, 0.0]
    assert bank.seen.tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_names_the_sample(bad):
    bank = MomentumBank(5)
    bank.record(torch.tensor([1, 3]), torch.tensor([0.5, bad]))
    with pytest.raises(EcvlError, match="sample 3"):
        bank.end_epoch()
    assert bank.seen.sum() == 0  # nothing half-updated


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_balanced_pick_matches_numpy(jit):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 300)
    offsets, order = (cpu.class_csr if jit else cpu.class_csr.py_func)(labels, 7)
    draw, u = cpu.balanced_draws(7, 1000, seed=3, epoch=2)
    out = np.empty(1000, np.int64)
    (cpu.balanced_pick if jit else cpu.balanced_pick.py_func)(offsets, order, draw, u, out)
    members = [np.flatnonzero(labels == c) for c in range(7)]
    expect = [members[c][min(int(x * len(members[c])), len(members[c]) - 1)] for c, x in zip(draw, u)]
    np.testing.assert_array_equal(out, expect)


def test_balanced_sampler_is_uniform_over_classes_and_seeded():
    labels = np.repeat(np.arange(10), [1000, 500, 250, 120, 60, 30, 15, 8, 4, 2])
    idx = cpu.balanced_indices(labels, 10, 20000, seed=0, epoch=0)
    freq = np.bincount(labels[idx], minlength=10)
    assert stats.chisquare(freq).pvalue > 1e-3
    np.testing.assert_array_equal(idx, cpu.balanced_indices(labels, 10, 20000, seed=0, epoch=0))
    assert not np.array_equal(idx, cpu.balanced_indices(labels, 10, 20000, seed=0, epoch=1))


@needs_gpu
def test_cuda_bank_matches_cpu_bank():
    rng = np.random.default_rng(1)
    batches = random_batches(rng, 5000, 20, 512, coverage=0.6)
    banks = [MomentumBank(5000, device=d) for d in ("cpu", "cuda")]
    for _ in range(3):
        for bank in banks:
            for idx, loss in batches:
                bank.record(torch.from_numpy(idx), torch.from_numpy(loss))
            bank.end_epoch()
    for name in ("ema", "seen", "m"):
        torch.testing.assert_close(getattr(banks[1], name).cpu(), getattr(banks[0], name), rtol=1e-4, atol=1e-5)


@needs_gpu
def test_cuda_nonfinite_and_balanced_pick():
    from ecvl_fast.kernels import cuda as kc

    bank = MomentumBank(10, device="cuda")
    bank.record(torch.tensor([2, 7]), torch.tensor([1.0, float("nan")]))
    with pytest.raises(EcvlError, match="sample 7"):
        bank.end_epoch()
    labels = np.random.default_rng(2).integers(0, 5, 100)
    offsets, order = cpu.class_csr(labels, 5)
    draw, u = cpu.balanced_draws(5, 4096, seed=1, epoch=0)
    ref = np.empty(4096, np.int64)
    cpu.balanced_pick(offsets, order, draw, u, ref)
    out = torch.empty(4096, dtype=torch.int64, device="cuda")
    cuda_in = [torch.from_numpy(a).cuda() for a in (offsets, order, draw, u)]
    kc.balanced_pick(*cuda_in, out)
    np.testing.assert_array_equal(out.cpu().numpy(), ref)
