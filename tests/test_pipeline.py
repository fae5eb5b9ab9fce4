"""The DALI memory-driven RandAugment: op parity with PIL, M semantics, and the loader end to end."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from dali_helpers import images, run, run_leaf
from ecvl_fast.loaders.dali_loader import AugmentedLoader
from ecvl_fast.loaders.draws import AugSpec, batch_draws, plan_slots
from ecvl_fast.loaders.ffcv_loader import ORDERS, make_loader, read_labels
from ecvl_fast.loaders.randaug_ops import LEAF_OF_OP, OP_INDEX, OPS
from ecvl_fast.loaders.torch_reference import reference_batch

B = 32


# Tolerances in 0..255 units. Rounding: DALI rounds to nearest where PIL truncates (max 1).
# equalize: DALI follows OpenCV's LUT formula, PIL its own, so only the mean is close.
# sharpness: PIL leaves the 1-px border unfiltered; compared on the interior.
TOLERANCE = {"equalize": ("mean", 16.0), "sharpness": ("interior-max", 1)}


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_op_matches_pil(op):
    imgs = images(8, 32)
    strengths, signs = np.linspace(0.25, 1, 8), [1, -1] * 4
    out = run_leaf(op.name, imgs, strengths, signs).astype(int)
    vs = [op.param(s, sign) for s, sign in zip(strengths, signs)]
    ref = np.stack([np.asarray(op.pil(Image.fromarray(im), v)) for im, v in zip(imgs, vs)]).astype(int)
    kind, tol = TOLERANCE.get(op.name, ("max", 1))
    diff = np.abs(out - ref)
    if kind == "mean":
        assert diff.mean() <= tol
    elif kind == "interior-max":
        assert diff[:, 1:-1, 1:-1].max() <= tol
    else:
        assert diff.max() <= tol
    if op.name != "identity":
        assert (out != imgs.astype(int)).any()


def test_equalize_matches_opencv():
    import cv2

    imgs = images(4, 32)
    out = run_leaf("equalize", imgs, np.ones(4), np.ones(4))
    ref = np.stack(
        [np.stack([cv2.equalizeHist(np.ascontiguousarray(im[..., c])) for c in range(3)], -1) for im in imgs]
    )
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


def test_m_zero_is_bit_identical_to_no_randaugment():
    imgs = images()
    spec = AugSpec(res=32, views=2)
    draws = batch_draws(spec, np.arange(B), seed=1, epoch=0)
    with_ra = run(spec, imgs, np.zeros(B), draws)
    plain_spec = AugSpec(res=32, views=2, randaug=False)
    plain = run(plain_spec, imgs, np.zeros(B), [{k: d[k] for k in ("flip", "box")} for d in draws])
    for v in range(2):
        np.testing.assert_array_equal(with_ra[v], plain[v])


def test_m_one_applies_k_ops_and_rate_tracks_m():
    spec = AugSpec(res=32, views=1, k=3)
    m = np.repeat([0.0, 0.1, 0.5, 0.9, 1.0], 400).astype(np.float32)
    d = batch_draws(spec, np.arange(len(m)), seed=2, epoch=0)[0]
    plans = plan_slots(spec, m, d)
    for j, (leaf, v, _) in enumerate(plans):
        drawn = LEAF_OF_OP[d["op"][j]]
        assert np.array_equal(leaf[m == 1.0], drawn[m == 1.0])  # M = 1: all k drawn ops run
        assert not leaf[m == 0.0].any()  # M = 0: nothing runs
        strength = m * d["zeta"][j]
        assert np.allclose(
            np.abs(v[(m == 1.0) & (d["op"][j] == OP_INDEX["rotate"])]),
            30 * strength[(m == 1.0) & (d["op"][j] == OP_INDEX["rotate"])],
            atol=1e-4,
        )
        applied = d["u"][j] < m
        assert np.array_equal(leaf != 0, applied & (drawn != 0))  # skipped ops run as identity
        for level in (0.1, 0.5, 0.9):
            hits = applied[m == level]
            assert stats.binomtest(int(hits.sum()), hits.size, level).pvalue > 1e-4


def test_strength_grows_with_m():
    imgs = images(128, 32)
    spec = AugSpec(res=32, views=1, k=2)
    draws = batch_draws(spec, np.arange(len(imgs)), seed=3, epoch=0)
    base = run(
        AugSpec(res=32, views=1, randaug=False), imgs, np.zeros(128), [{k: draws[0][k] for k in ("flip", "box")}]
    )[0]
    change = [np.abs(run(spec, imgs, np.full(128, m), draws)[0] - base).mean() for m in (0.2, 0.5, 0.8, 1.0)]
    assert all(a < b for a, b in zip(change, change[1:])), change


@pytest.mark.parametrize("randaug", [False, True])
def test_pipeline_matches_reference(randaug):
    imgs = images(16, 40)
    spec = AugSpec(res=32, views=2, randaug=randaug)
    m = np.linspace(0, 1, 16)
    draws = batch_draws(spec, np.arange(16), seed=4, epoch=1)
    dali = run(spec, imgs, m, draws)
    ref = reference_batch(imgs, m, draws, spec)
    for v in range(2):
        diff = np.abs(dali[v] - ref[v].permute(0, 2, 3, 1).numpy())
        # Crops resample with different filters (DALI vs PIL antialiasing): small mean error;
        # thresholded ops can then flip single pixels, so only the mean is bounded.
        assert diff.mean() < (0.05 if not randaug else 0.15), diff.mean()


class Magnitudes:
    """What the loader is handed: the bank's interface over a plain tensor the test rewrites."""

    def __init__(self, m: torch.Tensor):
        self.m, self.reads = m, 0

    def magnitudes(self) -> np.ndarray:
        self.reads += 1
        return self.m.numpy().copy()


@pytest.mark.parametrize("order", ORDERS)
def test_loader_end_to_end(mnist, order):
    path = mnist / ("test.beton" if order == "sequential" else "train.beton")
    labels = read_labels(path)
    m = torch.rand(len(labels))
    train = order != "sequential"
    loader = AugmentedLoader(
        make_loader(path, order, 64, 36, num_classes=10),
        AugSpec(res=32, train=train, views=2 if train else 1),
        Magnitudes(m),
    )
    for epoch in range(2):
        seen = []
        for views, y, idx in loader:
            assert all(
                v.shape == (len(y), 3, 32, 32) and v.is_contiguous(memory_format=torch.channels_last) for v in views
            )
            assert torch.equal(y, torch.from_numpy(labels[idx.numpy()]))
            seen.append(idx)
        seen = torch.cat(seen)
        assert len(seen) == (len(labels) if not train else len(labels) // 64 * 64)
        if order == "sequential":
            assert sorted(seen.tolist()) == list(range(len(labels)))
        if order == "balanced":
            counts = np.bincount(labels[seen.numpy()], minlength=10)
            assert counts.min() > 40  # the rarest class has 4 images but is drawn ~1/10 of the time


def test_loader_turns_off_ffcv_streams(mnist, monkeypatch):
    """ffcv's epoch thread would open a CUDA context on GPU 0 in every rank through its streams;
    the loader switches that path off (its slots stay pinned)."""
    from ffcv.loader import epoch_iterator

    monkeypatch.setattr(epoch_iterator, "IS_CUDA", True)  # as on a GPU machine
    make_loader(mnist / "test.beton", "sequential", 64, 32)
    assert epoch_iterator.IS_CUDA is False


def test_m_written_after_an_epoch_is_used_next_epoch(mnist):
    path = mnist / "train.beton"
    bank = Magnitudes(torch.zeros(len(read_labels(path))))
    loader = AugmentedLoader(make_loader(path, "sequential", 64, 32), AugSpec(res=32, train=False), bank)
    first = torch.cat([v[0] for v, _, _ in loader])
    bank.m.fill_(1.0)  # what the kernels do in place at epoch end
    second = torch.cat([v[0] for v, _, _ in loader])
    assert not torch.equal(first, second) and bank.reads == 2  # M is read once per epoch


@pytest.mark.parametrize("order", ["random", "balanced"])
def test_prefetching_loader_yields_the_synchronous_batches(mnist, order):
    """A feeder thread two batches ahead, and DALI's pipelined executor with two or three batches in
    flight, give exactly the batches and views of the synchronous loader, over two epochs with M
    rewritten between them (M is fixed within an epoch)."""
    path = mnist / "train.beton"
    n, spec = len(read_labels(path)), AugSpec(res=32, views=2, k=2)
    runs = []
    for prefetch, queue in ((0, 1), (2, 1), (0, 2), (2, 3)):
        bank = Magnitudes(torch.zeros(n))
        loader = AugmentedLoader(
            make_loader(path, order, 64, 32, num_classes=10, seed=3), spec, bank, seed=3, prefetch=prefetch, queue=queue
        )
        epochs = []
        for epoch in range(2):
            epochs.append([(torch.cat(v), y, i) for v, y, i in loader])
            bank.m.copy_(torch.rand(n, generator=torch.Generator().manual_seed(epoch)))  # the kernels, at epoch end
        runs.append(epochs)
    for other in runs[1:]:
        for sync, pre in zip(runs[0], other):
            assert len(sync) == len(pre) == n // 64
            for (a, y, i), (b, y2, i2) in zip(sync, pre):
                assert torch.equal(a, b) and torch.equal(y, y2) and torch.equal(i, i2)
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])


def test_prefetching_stops_early_and_surfaces_errors():
    from ecvl_fast.loaders.dali_loader import prefetched

    def batches():
        yield from range(3)
        raise ValueError("decoder broke")

    it = prefetched(batches(), 2)
    assert [next(it), next(it)] == [0, 1]
    it.close()  # leaving early joins the feeder
    with pytest.raises(ValueError, match="decoder broke"):
        list(prefetched(batches(), 2))


def test_the_pipelined_executor_left_early_or_on_a_short_epoch():
    """DALI's first pipelined run takes `queue` batches: an epoch of one batch (an evaluation split)
    still comes out whole, and leaving an epoch early drains what is in flight, so the next epoch
    starts on its own first batch."""
    from ecvl_fast.bench.synthetic import fake_images
    from ecvl_fast.loaders.held import HeldLoader

    imgs, labels = fake_images(192, 0, 40), np.arange(192) % 10
    spec = AugSpec(res=32, train=False, randaug=False)
    sync = [torch.cat(v) for v, _, _ in AugmentedLoader(HeldLoader(imgs, labels, "sequential", 64), spec, queue=1)]
    short = AugmentedLoader(HeldLoader(imgs[:64], labels[:64], "sequential", 64), spec, queue=3)
    for _ in range(2):
        (views, y, idx), *rest = list(short)
        assert not rest and torch.equal(views[0], sync[0]) and idx.tolist() == list(range(64))
    for prefetch in (0, 2):
        loader = AugmentedLoader(HeldLoader(imgs, labels, "sequential", 64), spec, queue=2, prefetch=prefetch)
        for views, _, _ in loader:
            break  # two batches were fed, one taken
        assert [torch.equal(torch.cat(v), s) for (v, _, _), s in zip(loader, sync)] == [True] * 3
        kept = iter(loader)  # an epoch's iterator held, not closed, with batches still in DALI
        next(kept)
        assert [torch.equal(torch.cat(v), s) for (v, _, _), s in zip(loader, sync)] == [True] * 3
        # the held epoch then goes on with its own batches: each iterator has a pipeline of its own
        # (two feeder threads on one pipeline took each other's batches, or waited forever)
        assert [torch.equal(torch.cat(v), s) for (v, _, _), s in zip(kept, sync[1:])] == [True] * 2
        del kept
    assert (loader.pipe.exec_async, loader.pipe.exec_pipelined, loader.pipe.prefetch_queue_depth) == (True, True, 2)

    class Failing(HeldLoader):  # a reader that fails after its first batch, once
        failed = False

        def __iter__(self):
            for n, batch in enumerate(super().__iter__()):
                if n == 1 and not self.failed:
                    Failing.failed = True
                    raise OSError("a read failed")
                yield batch

    fed = AugmentedLoader(Failing(imgs, labels, "sequential", 64), spec, queue=3, prefetch=0)
    with pytest.raises(OSError, match="a read failed"):  # one batch fed, none run: the error is the reader's
        list(fed)
    fed.epoch = 0  # and the next epoch starts on a new pipeline, on its own batches
    assert [torch.equal(torch.cat(v), s) for (v, _, _), s in zip(fed, sync)] == [True] * 3


def test_the_loader_asks_dali_for_its_executor_settings():
    """What the loader builds: the pipelined executor with two batches in flight on a GPU, one
    batch at a time on a CPU (data.dali_queue = 0), or what the config names."""
    from ecvl_fast.config import load_config
    from ecvl_fast.training.data import dali_queue

    assert (dali_queue(load_config(None), "cuda"), dali_queue(load_config(None), "cpu")) == (2, 1)
    assert dali_queue(load_config(None, ["data.dali_queue=3"]), "cpu") == 3


def test_the_gpu_graph_traced_without_a_gpu():
    """Operator instances of the training graph as DALI runs it on a GPU (two views, k = 2), counted
    from its definition: no GPU is needed until it is built. Before the enhance ops' factor moved to
    the host (docs/gpu.md), the host ran 89 operators per batch: 32 arithmetic on per-sample scalars."""
    from ecvl_fast.loaders.dali_graph import define_pipeline, graph_ops

    gpu = graph_ops(define_pipeline(AugSpec(res=32, views=2, k=2), 64, device_id=0))
    assert gpu == {"gpu": 92, "cpu": 40, "splits/merges": 70, "inputs": 8, "host": 81}
    cpu = graph_ops(define_pipeline(AugSpec(res=32, views=2, k=2), 64))
    assert cpu["gpu"] == 0 and cpu["host"] == 200
    plain = graph_ops(define_pipeline(AugSpec(res=32, views=1, randaug=False), 64, device_id=0))
    assert plain == {"gpu": 2, "cpu": 0, "splits/merges": 0, "inputs": 4, "host": 3}  # resize, normalise


def test_half_precision_output_for_a_16_bit_step():
    """On a GPU with a bf16 or fp16 step the graph writes float16 (half the bytes of float32, then
    converted on the device). On DALI's CPU backend: float16 is within 1 LSB of float32 rounded by
    torch (DALI rounds its own unrounded result: ties land apart in ~0.1% of values); bf16 through
    float16 is within 1 LSB of bf16 straight from float32, and differs in ~6% of values (double
    rounding: float16 keeps only 3 more bits than bf16)."""
    imgs = images(32, 40)
    spec = AugSpec(res=32, views=2, k=2)
    draws = batch_draws(spec, np.arange(32), seed=6, epoch=0)
    m = np.linspace(0, 1, 32)
    full = torch.from_numpy(np.stack(run(spec, imgs, m, draws)))
    half = torch.from_numpy(np.stack(run(AugSpec(res=32, views=2, k=2, out="float16"), imgs, m, draws)))
    assert half.dtype == torch.float16
    for ours, straight, share in ((half, full.half(), 0.01), (half.bfloat16(), full.bfloat16(), 0.1)):
        lsb = (ours.view(torch.int16).int() - straight.view(torch.int16).int()).abs()
        assert lsb.max() <= 1 and (lsb > 0).float().mean() < share
