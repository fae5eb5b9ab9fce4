"""The threaded loader: FFCV (or in-memory) batches through the DALI graph, built ahead of the
step in a feeder thread, and on GPU handed over on the feeder's own CUDA stream (DEVELOPERS.md,
"The GPU data path")."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque

import numpy as np

from ecvl_fast.loaders.dali_graph import build_pipeline, feed
from ecvl_fast.loaders.draws import AugSpec, batch_draws, sample_min_scales


class AugmentedLoader:
    """FFCV batches through the DALI pipeline: yields ([view NCHW channels_last], labels, indices),
    all three on `device` (bf16 views on GPU), so the step never copies or syncs for its inputs.

    `memory` is where M comes from: the momentum bank, or anything with `.magnitudes()` -> M per sample. It is read
    once at the start of each epoch, so values the kernels wrote at the end of epoch t are used
    throughout epoch t+1, and no per-batch device-to-host copy sits on the step's path.

    With `prefetch` > 0 a feeder thread builds up to that many batches ahead of the step. M is
    fixed for the epoch and every draw is a function of (seed, epoch, position), so the batches
    are exactly those of the synchronous loader; the feeder never runs past the epoch's end.

    On GPU the feeder owns a CUDA stream, so its copies and DALI's work overlap the step (see
    `_feed`, `_take`); each batch carries an event the consumer's stream waits on (`_handed_over`).
    """

    def __init__(
        self,
        loader,
        spec: AugSpec,
        memory=None,
        *,
        device="cpu",
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        threads: int = 2,
        prefetch: int = 2,
        dtype=None,
        queue: int = 0,
    ):
        import torch

        self.loader, self.spec, self.memory, self.seed, self.rank, self.world = loader, spec, memory, seed, rank, world
        self.prefetch = prefetch
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        if gpu and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # High priority: the next batch's augmentation is scheduled ahead of the step's queued kernels
        self.stream = torch.cuda.Stream(self.device, priority=-1) if gpu else None
        self.dtype = dtype or (torch.bfloat16 if gpu else torch.float32)  # the step's compute dtype (on GPU)
        if gpu and self.dtype in (torch.float16, torch.bfloat16):  # DALI writes half the bytes: float16, within
            spec = dataclasses.replace(spec, out="float16")  # 1 LSB of the float32 path (tests/test_pipeline.py)
        self.spec = spec
        self.queue = queue_depth(queue, gpu)
        self._build = dict(device_id=self.device.index if gpu else None, threads=threads, seed=seed, queue=self.queue)
        self._state, self._claim = self._fresh_pipeline(), threading.Lock()
        self.timings = None  # a list to profile the feed into (`bench profile`): one dict per batch

    @property
    def pipe(self):
        """The DALI pipeline of the latest epoch started."""
        return self._state.pipe

    def _fresh_pipeline(self) -> _Pipe:
        return _Pipe(build_pipeline(self.spec, self.loader.batch_size, **self._build), primed=self.queue == 1)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch(self) -> int:
        return self.loader.next_epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.loader.next_epoch = value

    def resume_at(self, epoch: int, step: int) -> None:
        """Start at batch `step` of `epoch`: the batches and views are those the uninterrupted run
        had there (every draw is a function of the position in the epoch)."""
        self.loader.next_epoch, self.loader.resume_at = epoch, (epoch, step)

    def __iter__(self):
        spec, epoch = self.spec, self.loader.next_epoch
        reads = self.memory is not None and (spec.randaug or spec.crop_m != 0)
        m = self.memory.magnitudes() if reads else None
        # each sample's minimum crop scale for the epoch, from M over the whole train set
        lows = sample_min_scales(spec, epoch, m, self.seed) if m is not None and spec.crop_m != 0 else None
        at = getattr(self.loader, "resume_at", None)
        first = at[1] if at is not None and at[0] == epoch else 0
        batches = self._batches(epoch, m if spec.randaug else None, first, lows)
        return _handed_over(prefetched(batches, self.prefetch) if self.prefetch > 0 else batches)

    def _batches(self, epoch: int, m, first: int = 0, lows=None):
        """(views, labels, indices, ready event or None) per batch from batch `first` of the epoch;
        runs in the feeder thread.

        With DALI's pipelined executor (`queue` > 1) up to `queue` batches are in DALI at once: batch
        n + 1 is fed and scheduled before batch n's output is taken, so DALI's host work for the next
        batch overlaps this batch's device work and the copy out. Every draw is fed with its batch,
        so the views are those of the synchronous executor, bit for bit. Leaving early drains what
        is in flight, so the next epoch starts on its own batches."""
        import torch

        gpu = self.device.type == "cuda"
        if gpu:  # a new thread starts on cuda:0; under torchrun rank r works on cuda:r
            torch.cuda.set_device(self.device)
        b, flight = self.loader.batch_size, deque()
        # A pipeline serves one epoch's iterator at a time. An earlier one still open (its feeder
        # thread alive, or dropped unclosed with batches in DALI) keeps its own; this one gets a new
        # pipeline, so the two never call the same DALI pipeline from two threads.
        with self._claim:  # two consumer threads starting epochs at once
            st = self._state
            if st.busy or st.in_dali:
                st = self._state = self._fresh_pipeline()
            st.busy = True
        try:
            for step, (images, labels, idx) in enumerate(self.loader, first):
                local = step * b + np.arange(len(labels))
                sizes = getattr(self.loader, "sizes", None)  # each image's size on the canvas (loaders/canvas.py)
                draws = batch_draws(
                    self.spec,
                    local * self.world + self.rank,
                    self.seed,
                    epoch,
                    None if sizes is None else sizes[idx.numpy()],
                    images.shape[1],
                    None if lows is None else lows[idx.numpy()],
                )
                mi = m[idx.numpy()] if m is not None else np.zeros(len(idx), np.float32)
                t0 = time.perf_counter()
                fed = self._feed(st, images, labels, idx, mi, draws)
                t1 = time.perf_counter()
                self._run(st, len(flight) + 1)
                record = None
                if self.timings is not None:  # host seconds: feeding the batch, DALI's scheduling
                    record = {"feed_s": t1 - t0, "schedule_s": time.perf_counter() - t1}
                    self.timings.append(record)
                flight.append((*fed, record))
                if len(flight) >= self.queue:
                    yield self._take(st, *flight.popleft())
            if flight and not st.primed:  # an epoch shorter than the queue, the pipeline's first:
                while len(flight) < self.queue:  # DALI's first run takes `queue` batches; repeat the
                    self._feed(st, images, labels, idx, mi, draws)  # last one, and drop what it makes
                    flight.append(None)
                self._run(st, len(flight))
            while flight:
                batch = flight.popleft()
                if batch is None:
                    st.drop()
                else:
                    yield self._take(st, *batch)
        finally:
            if flight:  # left early (or an error): what DALI still holds is taken and dropped
                try:
                    if not st.primed:
                        raise RuntimeError("fed, never run")
                    while flight:
                        flight.popleft()
                        st.drop()
                except Exception:  # fed but not run, or DALI failed: the next epoch gets a new pipeline
                    st.in_dali = max(st.in_dali, 1)
            st.busy = False

    def _run(self, st: _Pipe, fed: int) -> None:
        """Schedule DALI's run of what was fed. The pipelined executor's first run takes `queue`
        batches at once (DALI's prefetch), so it waits until that many are fed; later runs take one."""
        if st.primed:
            st.pipe.schedule_run()
        elif fed >= self.queue:
            st.pipe.schedule_run()
            st.primed = True

    def _feed(self, st: _Pipe, images, labels, idx, mi, draws):
        """Feed one batch to DALI; returns what `_take` needs. On GPU the host-to-device copies run
        on the feeder's stream, and DALI copies the images on it too.

        ffcv yields pinned slots it refills as soon as we take a later batch, and a non-blocking
        copy from pinned memory reads it whenever the stream gets there. So we wait for our copies
        (microseconds for a batch) before returning to ffcv for the next batch."""
        import torch

        st.in_dali += 1
        if self.device.type != "cuda":
            feed(st.pipe, self.spec, images.numpy(), mi, draws)  # DALI copies the batch in
            return labels.to(torch.int64).clone(), idx.to(torch.int64).clone()
        with torch.cuda.stream(self.stream):
            x = images.to(self.device, non_blocking=True)
            y = _pinned(labels).to(self.device, non_blocking=True).to(torch.int64)
            i = _pinned(idx).to(self.device, non_blocking=True).to(torch.int64)
            copied = torch.cuda.Event(blocking=True)  # its wait sleeps instead of spinning a core
            copied.record(self.stream)
            feed(st.pipe, self.spec, x, mi, draws)  # DALI copies `x` on this (current) stream
        copied.synchronize()
        return y, i

    def _take(self, st: _Pipe, labels, idx, record=None):
        """The oldest batch in flight out of DALI: its views copied into memory torch owns, then
        DALI's buffer released. On GPU the copy and the cast to the step's dtype run on the feeder's
        stream; the buffer is released once they are done (the event a consumer's stream waits on)."""
        import torch

        gpu = self.device.type == "cuda"
        t0 = time.perf_counter()
        out = st.pipe.outputs()[0]
        st.in_dali -= 1
        t1 = time.perf_counter()
        ready = None
        if not gpu:
            views = list(_to_torch(out, self.device).chunk(self.spec.views))
        else:
            with torch.cuda.stream(self.stream):
                views = list(_to_torch(out, self.device, self.stream, self.dtype).chunk(self.spec.views))
                ready = torch.cuda.Event(blocking=True)
                ready.record(self.stream)
            ready.synchronize()  # the copy out of DALI's buffer is done before DALI may reuse it
        st.pipe.release_outputs()
        if record is not None:  # the wait for DALI's output, then the copy out of it (and its wait)
            record.update(outputs_wait_s=t1 - t0, copy_s=time.perf_counter() - t1)
        return views, labels, idx, ready


@dataclasses.dataclass
class _Pipe:
    """A DALI pipeline and what is in it, used by one epoch's iterator at a time (`busy`)."""

    pipe: object
    primed: bool  # the pipelined executor's first run (it takes `queue` batches) has been scheduled
    in_dali: int = 0  # batches fed and not taken out: an iterator dropped unclosed leaves some
    busy: bool = False  # an epoch's iterator (its feeder thread) is using it

    def drop(self) -> None:
        """Take the oldest batch out and discard it."""
        self.pipe.outputs()
        self.pipe.release_outputs()
        self.in_dali -= 1


def queue_depth(queue: int, gpu: bool) -> int:
    """Batches in DALI at once (its prefetch queue; 1: the synchronous executor); 0: 2 on a GPU, so
    that DALI's host work for the next batch overlaps the device work for this one, and 1 on a CPU,
    where DALI does all of it on the same cores."""
    return queue or (2 if gpu else 1)


def _pinned(t):
    return t if t.is_pinned() else t.pin_memory()


def _handed_over(batches):
    """The consumer's side: on GPU, its current stream waits for the feeder's event, and every
    tensor made on the feeder's stream is marked as used on the consumer's (`record_stream`), so
    the caching allocator does not hand its memory back to the feeder while the step reads it."""
    import torch

    for views, labels, idx, ready in batches:
        if ready is not None:
            stream = torch.cuda.current_stream(views[0].device)
            stream.wait_event(ready)
            for t in (*views, labels, idx):
                t.record_stream(stream)
        yield views, labels, idx


def prefetched(batches, depth: int):
    """Run the generator `batches` in a feeder thread, at most `depth` items ahead of the consumer.
    Errors surface in the consumer; leaving early stops and joins the feeder."""
    import queue
    import threading

    q, stop, end = queue.Queue(maxsize=depth), threading.Event(), object()

    def feeder():
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
            q.put((end, None))
        except BaseException as e:  # handed to the consumer
            q.put((end, e))
        finally:
            batches.close()

    thread = threading.Thread(target=feeder, daemon=True, name="ecvl-feeder")
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, tuple) and len(item) == 2 and item[0] is end:
                if item[1] is not None:
                    raise item[1]
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def _to_torch(tl, device, stream=None, dtype=None):
    """DALI NHWC float output -> NCHW channels_last (a free permute); `dtype` on GPU. Always a copy
    in memory torch owns: DALI reuses its output buffer once it is released.

    On GPU the copy goes through DALI's `feed_ndarray` on `stream`, which orders it after DALI's
    own work on its internal stream, then converts to the compute dtype on the same stream."""
    import torch

    if device.type != "cuda":
        return torch.from_dlpack(tl.as_tensor()).clone().permute(0, 3, 1, 2)
    from nvidia.dali.plugin.pytorch import feed_ndarray
    from nvidia.dali.plugin.pytorch.torch_utils import to_torch_type

    t = tl.as_tensor()
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)  # float16, or float32
    feed_ndarray(t, out, cuda_stream=stream)
    return out.to(dtype or torch.bfloat16).permute(0, 3, 1, 2)
