"""Kernels against plain numpy references, with the JIT on and off, and the CUDA twins on a GPU."""

import numpy as np
import pytest
import torch

from ecvl_fast import EcvlError
from ecvl_fast.kernels import cpu
from ecvl_fast.kernels.bank import MomentumBank

GPU = torch.cuda.is_available()


def needs_gpu(test):
    """Selected by `-m gpu` (the device check); skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not GPU, reason="needs a CUDA device")(test))


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


def ref_normalise(ema, seen, labels):
    """eq. 9, BCL's form, written the long way with the std; never-seen samples take their
    class's mean M (the mean over all seen samples if their class has none seen)."""
    m, s = np.zeros(len(ema)), seen.astype(bool)
    v = ema[s].astype(np.float64)
    if len(v) == 0:
        return m
    std = v.std()
    if std == 0:
        m[s] = 0.5
    else:
        z = (v - v.mean()) / std
        m[s] = z / np.abs(z).max() / 2 + 0.5
    for i in np.flatnonzero(~s):
        same = s & (labels == labels[i])
        m[i] = m[same].mean() if same.any() else m[s].mean()
    return m


def run_cpu(n, batches, beta, epochs, jit, labels):
    k = (lambda f: f) if jit else (lambda f: f.py_func)
    s, c = np.zeros(n, np.float32), np.zeros(n, np.int32)
    ema, seen, m = np.zeros(n, np.float32), np.zeros(n, np.uint8), np.zeros(n, np.float32)
    for _ in range(epochs):
        for idx, loss in batches:
            k(cpu.accumulate)(s, c, idx, loss)
        assert k(cpu.first_nonfinite)(s, c) == -1
        k(cpu.end_epoch)(ema, seen, s, c, beta)
        k(cpu.normalise)(ema, seen, labels, m, int(labels.max()) + 1)
    return ema, seen, m


def random_batches(rng, n, n_batches, size, coverage=1.0):
    pool = rng.choice(n, size=max(1, int(n * coverage)), replace=False)
    return [
        (rng.choice(pool, size=size).astype(np.int64), rng.gamma(2.0, 1.0, size).astype(np.float32))
        for _ in range(n_batches)
    ]


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
    labels = rng.integers(0, 7, n)
    if case == "unseen":
        labels[labels == 6] = 5  # class 6 absent; class 5's members partly unseen
        batches = [(idx[labels[idx] != 4], loss[labels[idx] != 4]) for idx, loss in batches]  # class 4: never seen
    ema, seen, m = run_cpu(n, batches, beta, epochs=3, jit=jit, labels=labels)
    r_ema, r_seen = np.zeros(n), np.zeros(n, np.uint8)
    for _ in range(3):
        r_ema, r_seen = ref_epoch(r_ema, r_seen, batches, beta)
    np.testing.assert_allclose(ema, r_ema, rtol=1e-5)
    np.testing.assert_array_equal(seen, r_seen)
    np.testing.assert_allclose(m, ref_normalise(r_ema, r_seen, labels), atol=1e-5)
    assert m.min() >= 0 and m.max() <= 1
    if case == "equal" or case == "n1":
        assert np.all(m[seen == 1] == 0.5)
    if case == "unseen":
        unseen_0 = (seen == 0) & (labels == 0)
        assert unseen_0.any() and np.allclose(m[unseen_0], m[(seen == 1) & (labels == 0)].mean())
        assert np.allclose(m[labels == 4], m[seen == 1].mean())  # no sample of class 4 seen
    if case == "random":
        assert abs(m.mean() - 0.5) < 0.25 and np.isclose(np.abs(m - 0.5).max(), 0.5)


def test_unseen_samples_keep_their_ema_and_take_their_class_mean_m():
    bank = MomentumBank([0, 0, 0, 1], beta=0.5)
    assert bank.magnitudes().tolist() == [0, 0, 0, 0]  # before any epoch: no augmentation
    bank.record(torch.tensor([0, 1]), torch.tensor([2.0, 4.0]))
    bank.end_epoch()
    bank.record(torch.tensor([0]), torch.tensor([6.0]))
    bank.end_epoch()
    assert bank.ema.tolist() == [4.0, 4.0, 0.0, 0.0]
    assert bank.seen.tolist() == [1, 1, 0, 0]
    bank.record(torch.tensor([0, 1]), torch.tensor([2.0, 6.0]))
    bank.end_epoch()  # ema 3 and 5: M 0 and 1
    assert bank.magnitudes().tolist() == [0.0, 1.0, 0.5, 0.5]  # sample 2: class 0's mean; 3: all seen


def test_rank_normalisation_spreads_m_evenly():
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2], 100)
    loss = np.r_[rng.gamma(2.0, 1.0, 299), 500.0].astype(np.float32)  # one outlier
    banks = {norm: MomentumBank(labels, beta=0.5, norm=norm) for norm in ("bcl", "rank")}
    seen = np.flatnonzero(labels != 2)[::2].tolist() + [299]  # half of classes 0 and 1, and the outlier
    for bank in banks.values():
        bank.record(torch.tensor(seen), torch.from_numpy(loss[seen]))
        bank.end_epoch()
    bcl, rank = (banks[n].magnitudes() for n in ("bcl", "rank"))
    assert np.ptp(np.quantile(bcl[seen], [0.1, 0.9])) < 0.05  # the outlier squeezes BCL's M around 0.5
    np.testing.assert_allclose(np.sort(rank[seen]), np.linspace(0, 1, len(seen)), atol=1e-6)
    assert (np.argsort(rank[seen], kind="stable") == np.argsort(loss[seen], kind="stable")).all()
    unseen0 = np.setdiff1d(np.flatnonzero(labels == 0), seen)
    assert np.allclose(rank[unseen0], rank[[i for i in seen if labels[i] == 0]].mean())
    with pytest.raises(EcvlError, match="unknown M normalisation"):
        MomentumBank(labels, norm="minmax")


def ref_class_scope(ema, seen, labels, num_classes, m):
    """aug.m_scope = "class" by hand: class means over seen samples, ranked by a stable sort over
    the classes that have one, on [0, 1]; 0.5 for a class with none; nothing seen: M unchanged."""
    s = seen.astype(bool)
    if not s.any():
        return m.copy()
    present = np.array([(s & (labels == c)).any() for c in range(num_classes)])
    means = np.array(
        [ema[s & (labels == c)].astype(np.float64).mean() if present[c] else 0.0 for c in range(num_classes)]
    )
    per_class = np.full(num_classes, 0.5)
    order = [c for c in np.argsort(means, kind="stable") if present[c]]
    for r, c in enumerate(order):
        per_class[c] = r / (len(order) - 1) if len(order) > 1 else 0.5
    return per_class[labels]


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize("case", ["random", "ties", "absent", "one-class", "none-seen"])
def test_class_scope_matches_numpy(jit, case):
    rng = np.random.default_rng(11)
    n, k = 120, 8
    labels = rng.integers(0, k, n)
    ema = rng.gamma(2.0, 1.0, n).astype(np.float32)
    seen = (rng.random(n) < 0.7).astype(np.uint8)
    if case == "ties":
        labels = np.repeat(np.arange(k), n // k)  # every class's samples share a loss of 1 or 2
        ema = np.repeat(rng.integers(1, 3, k), n // k).astype(np.float32)
    elif case == "absent":
        seen[labels == 3] = 0  # class 3 never seen
        labels[labels == 7] = 6  # class 7 has no samples
    elif case == "one-class":
        seen[labels != 2] = 0
    elif case == "none-seen":
        seen[:] = 0
    m = rng.random(n).astype(np.float32)
    expected = ref_class_scope(ema, seen, labels, k, m)
    (cpu.class_scope if jit else cpu.class_scope.py_func)(ema, seen, labels, m, k)
    np.testing.assert_allclose(m, expected, atol=1e-6)
    if case == "random":
        assert m.min() == 0.0 and m.max() == 1.0 and len(np.unique(m)) == k
        for c in range(k):
            assert np.ptp(m[labels == c]) == 0  # one M per class
    if case == "absent":
        assert np.allclose(m[labels == 3], 0.5)
    if case == "ties":  # equal means: the lower class index ranks first, as a stable sort
        assert len(np.unique(m)) == k


def test_bank_scope_direction_and_frequency_control():
    """The bank's options against numpy: M per class, M reversed, and the fixed no-memory M."""
    from ecvl_fast.kernels.bank import frequency_magnitudes

    rng = np.random.default_rng(5)
    labels = np.r_[np.zeros(40), np.ones(20), np.full(10, 2), np.full(5, 3), np.full(5, 4)].astype(np.int64)
    batches = random_batches(rng, len(labels), 4, 32, coverage=0.8)
    kinds = {
        "plain": {},
        "easy": {"direction": "easy"},
        "class": {"scope": "class"},
        "class-easy": {"scope": "class", "direction": "easy"},
        "freq": {"fixed": frequency_magnitudes(labels, "hard")},
    }
    banks = {name: MomentumBank(labels, beta=0.9, **kw) for name, kw in kinds.items()}
    assert banks["easy"].magnitudes().tolist() == [0.0] * len(labels)  # nothing seen: no augmentation
    for _ in range(2):
        for bank in banks.values():
            for idx, loss in batches:
                bank.record(torch.from_numpy(idx), torch.from_numpy(loss))
            bank.end_epoch()
    m = {name: bank.magnitudes() for name, bank in banks.items()}
    ema, seen = banks["plain"].ema.numpy(), banks["plain"].seen.numpy()
    np.testing.assert_allclose(m["plain"], ref_normalise(ema, seen, labels), atol=1e-5)
    np.testing.assert_allclose(m["easy"], 1 - m["plain"], atol=1e-6)
    by_class = ref_class_scope(ema, seen, labels, 5, m["plain"])
    np.testing.assert_allclose(m["class"], by_class, atol=1e-6)
    np.testing.assert_allclose(m["class-easy"], 1 - by_class, atol=1e-6)
    # the control: rank of 1/n_c over classes, rarest 1; classes 3 and 4 tie (5 each): class order
    np.testing.assert_allclose(m["freq"], np.array([0, 0.25, 0.5, 0.75, 1.0])[labels], atol=1e-6)
    np.testing.assert_allclose(
        frequency_magnitudes(labels, "easy"), np.array([1, 0.75, 0.5, 0, 0.25])[labels], atol=1e-6
    )
    assert banks["freq"].seen.sum() > 0  # the EMA is kept, M is not touched by it
    with pytest.raises(EcvlError, match="unknown M scope"):
        MomentumBank(labels, scope="batch")
    with pytest.raises(EcvlError, match="unknown M direction"):
        MomentumBank(labels, direction="up")


def ref_lol(loss_sum, loss_count, labels, level, levels, accept):
    """Ahn et al.'s level-of-learning step by hand: per class, accuracy = summed correctness over
    trials this epoch; above `accept` one level up, else one down, within [0, levels]; a class
    with no trials keeps its level. M = level / levels."""
    level = level.copy()
    for c in range(len(level)):
        mine = labels == c
        trials = loss_count[mine].sum()
        if trials > 0:
            up = loss_sum[mine].sum() / trials > accept
            level[c] = min(max(level[c] + (1 if up else -1), 0), levels)
    return level, level[labels] / levels


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_lol_update_matches_numpy(jit):
    rng = np.random.default_rng(13)
    n, k, levels = 200, 7, 4
    labels = rng.integers(0, k, n)
    labels[labels == 6] = 5  # class 6 has no samples: no trials, level kept
    level = np.array([0, 4, 2, 2, 1, 3, 3], np.int32)  # 0 and 4: the clamps
    count = rng.integers(0, 3, n).astype(np.int32)
    count[labels == 2] = 0  # class 2: present but not drawn this epoch
    acc = np.array([0.9, 0.9, 0.5, 0.2, 0.5, 0.75, 0.0])  # class 4 at exactly accept (0.5): not above, down
    right = np.zeros(n, np.float32)
    for c in range(k):  # per sample: count views, of which a share acc[c] right (exact per class)
        mine = np.flatnonzero(labels == c)
        right[mine] = count[mine] * acc[c]
    exp_level, exp_m = ref_lol(right, count, labels, level, levels, 0.5)
    assert exp_level.tolist() == [1, 4, 2, 1, 0, 4, 3]
    m = np.full(n, -1, np.float32)
    (cpu.lol_update if jit else cpu.lol_update.py_func)(right, count, labels, level, m, levels, 0.5)
    assert level.tolist() == exp_level.tolist()
    np.testing.assert_allclose(m, exp_m, atol=1e-7)


def test_lol_bank_levels_rise_with_accuracy_and_resume():
    """The bank with aug.m_source = "lol": correctness recorded per step, one level step per epoch,
    M = level / levels from the next epoch, the levels in its state (resume)."""
    labels = np.repeat(np.arange(3), 10)
    bank = MomentumBank(labels, lol=(4, 0.6))
    idx = torch.arange(30)
    right = torch.tensor(np.repeat([1.0, 0.5, 0.0], 10), dtype=torch.float32)  # class 0 learned, 1 half, 2 not
    for epoch in range(3):
        bank.record(idx, right)
        bank.end_epoch()
    assert bank.level.tolist() == [3, 0, 0]
    np.testing.assert_allclose(bank.magnitudes(), np.repeat([0.75, 0.0, 0.0], 10))
    again = MomentumBank(labels, lol=(4, 0.6))
    again.load_state_dict(bank.state_dict())
    for b in (bank, again):
        b.record(idx, 1 - right)  # now class 2 is learned and class 0 is not
        b.end_epoch()
    assert again.level.tolist() == bank.level.tolist() == [2, 0, 1]
    np.testing.assert_allclose(again.magnitudes(), bank.magnitudes())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_names_the_sample(bad):
    bank = MomentumBank(np.zeros(5, np.int64))
    bank.record(torch.tensor([1, 3]), torch.tensor([0.5, bad]))
    with pytest.raises(EcvlError, match="sample 3"):
        bank.end_epoch()
    assert bank.seen.sum() == 0  # nothing half-updated


def test_bank_device_is_indexed_so_its_own_indices_match(monkeypatch):
    """A bank built on "cuda" must accept indices on cuda:0, which is how every tensor reports its
    device (torch.device("cuda") != torch.device("cuda", 0)). Plain devices, no GPU needed."""
    from ecvl_fast.kernels.bank import canonical_device

    assert torch.device("cuda") != torch.device("cuda", 0)  # the rule that broke it
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert canonical_device("cuda") == torch.device("cuda", 1)
    assert canonical_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert canonical_device("cpu") == torch.device("cpu") == canonical_device(torch.device("cpu"))


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
    from scipy import stats  # here, not at the top: the GPU check machine has no scipy

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
    labels = rng.integers(0, 50, 5000)
    banks = [MomentumBank(labels, device=d) for d in ("cpu", "cuda")]
    for _ in range(3):
        for bank in banks:
            for idx, loss in batches:
                bank.record(torch.from_numpy(idx).to(bank.device), torch.from_numpy(loss).to(bank.device))
            bank.end_epoch()
    for name in ("ema", "seen", "m"):
        torch.testing.assert_close(getattr(banks[1], name).cpu(), getattr(banks[0], name), rtol=1e-4, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("options", [{"scope": "class"}, {"scope": "class", "direction": "easy"}])
def test_cuda_bank_options_match_cpu_bank(options):
    rng = np.random.default_rng(2)
    batches = random_batches(rng, 5000, 20, 512, coverage=0.6)
    labels = rng.integers(0, 300, 5000)
    banks = [MomentumBank(labels, device=d, **options) for d in ("cpu", "cuda")]
    for _ in range(2):
        for bank in banks:
            for idx, loss in batches:
                bank.record(torch.from_numpy(idx).to(bank.device), torch.from_numpy(loss).to(bank.device))
            bank.end_epoch()
    torch.testing.assert_close(banks[1].m.cpu(), banks[0].m, rtol=0, atol=1e-5)


@needs_gpu
def test_cuda_lol_bank_matches_cpu_bank():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 300, 5000)
    batches = [
        (idx, (rng.random(512) < 0.3 + 0.6 * (labels[idx] % 2)).astype(np.float32))
        for idx, _ in random_batches(rng, 5000, 20, 512, coverage=0.6)
    ]
    banks = [MomentumBank(labels, device=d, lol=(10, 0.6)) for d in ("cpu", "cuda")]
    for _ in range(3):
        for bank in banks:
            for idx, right in batches:
                bank.record(torch.from_numpy(idx).to(bank.device), torch.from_numpy(right).to(bank.device))
            bank.end_epoch()
    assert banks[0].level.max() > 0 and banks[0].level.min() == 0
    torch.testing.assert_close(banks[1].level.cpu(), banks[0].level)
    torch.testing.assert_close(banks[1].m.cpu(), banks[0].m, rtol=0, atol=1e-6)


@needs_gpu
def test_cuda_nonfinite():
    bank = MomentumBank(np.zeros(10, np.int64), device="cuda")
    bank.record(torch.tensor([2, 7], device="cuda"), torch.tensor([1.0, float("nan")], device="cuda"))
    with pytest.raises(EcvlError, match="sample 7"):
        bank.end_epoch()


SIMULATED = """
import numpy as np
from ecvl_fast.kernels import cpu, cuda as kc

rng = np.random.default_rng(3)
n, k = 300, 6
labels = rng.integers(0, k, n)
labels[labels == 5] = 4  # class 5: no samples
cpu_state = [np.zeros(n, np.float32), np.zeros(n, np.int32), np.zeros(n, np.float32), np.zeros(n, np.uint8),
                 np.zeros(n, np.float32)]
sim_state = [a.copy() for a in cpu_state]
for epoch in range(3):
    idx = rng.choice(np.flatnonzero(labels != 3), 200).astype(np.int64)  # class 3 never seen
    loss = rng.gamma(2.0, 1.0, 200).astype(np.float32)
    s, c, ema, seen, m = cpu_state
    cpu.accumulate(s, c, idx, loss)
    cpu.end_epoch(ema, seen, s, c, 0.97)
    cpu.normalise(ema, seen, labels, m, k)
    s, c, ema, seen, m = sim_state
    kc._accumulate[1, 256](s, c, idx, loss)
    kc._end_epoch[2, 256](ema, seen, s, c, 0.97)
    acc, cls = np.array([0.0, 0.0, np.inf, -np.inf]), np.zeros((k, 2))
    kc._stats[2, 32](ema, seen, acc)
    kc._write_seen[2, 256](ema, seen, labels, m, acc, cls)
    kc._write_unseen[2, 256](seen, labels, m, acc, cls)
for a, b in zip(cpu_state, sim_state):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
assert (cpu_state[3][labels == 3] == 0).all() and cpu_state[4][labels == 3].std() == 0

# aug.m_scope = "class" (class 3 unseen, class 5 empty; classes 0 and 1 tied), and nothing seen
ema, seen = cpu_state[2].copy(), cpu_state[3].copy()
ema[labels == 1] = ema[labels == 0].mean()
for seen_now in (seen, np.zeros_like(seen)):
    m_cpu, m_sim = np.full(n, 0.25, np.float32), np.full(n, 0.25, np.float32)
    cpu.class_scope(ema, seen_now, labels, m_cpu, k)
    acc, means = np.zeros((k, 2)), np.zeros(k)
    present, per_class = np.zeros(k, np.uint8), np.zeros(k)
    kc._class_sums[2, 256](ema, seen_now, labels, acc)
    kc._class_means[1, 32](acc, means, present)
    kc._rank_classes[1, 32](means, present, per_class)
    kc._write_class[2, 256](labels, m_sim, per_class)
    np.testing.assert_allclose(m_sim, m_cpu, atol=1e-6)
assert (m_cpu == 0.25).all()  # nothing seen: left alone

# aug.m_source = "lol": class 3 has no trials (level kept), class 5 no samples
right = (rng.random(n) < 0.3 + 0.5 * (labels % 2)).astype(np.float32) * 2
count = np.where(labels == 3, 0, 2).astype(np.int32)
right[labels == 3] = 0
for level_now in (np.array([0, 1, 2, 3, 4, 2], np.int32),):
    lv_cpu, lv_sim = level_now.copy(), level_now.copy()
    m_cpu, m_sim = np.zeros(n, np.float32), np.zeros(n, np.float32)
    cpu.lol_update(right, count, labels, lv_cpu, m_cpu, 4, 0.6)
    acc = np.zeros((k, 2))
    kc._class_totals[2, 256](right, count, labels, acc)
    kc._lol_levels[1, 32](acc, lv_sim, 4, 0.6)
    kc._write_level[2, 256](labels, m_sim, lv_sim, 4)
    assert lv_sim.tolist() == lv_cpu.tolist() and lv_cpu[3] == 3 and lv_cpu[5] == 2, (lv_cpu, lv_sim)
    np.testing.assert_allclose(m_sim, m_cpu, atol=1e-7)
print("ok")
"""


def test_cuda_kernels_in_numba_simulator_match_cpu():
    """The CPU twin of the CUDA kernels: the same kernel source under numba's CUDA simulator."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    done = subprocess.run([sys.executable, "-c", SIMULATED], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
