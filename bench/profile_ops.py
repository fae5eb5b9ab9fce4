"""Profile the DALI graph alone (images fed from memory, no FFCV): crop + normalise only, the
RandAugment graph with every op skipped (M = 0), with M ~ U(0, 1), and each op forced on every
sample. Two views, batch 128, 2 DALI threads.

    .venv/bin/python bench/profile_ops.py 32      # or 224 (decoded at 256, cropped to 224)
"""
import sys
import time

import numpy as np

from ecvl_fast.loaders import randaug_ops as ro
from ecvl_fast.loaders.dali_graph import build_pipeline, feed
from ecvl_fast.loaders.draws import AugSpec, batch_draws


def main(res: int, batch: int = 128, seconds: float = 2.0) -> None:
    rng = np.random.default_rng(0)
    side = 256 if res > 64 else res
    imgs = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    spec, plain = AugSpec(res=res, views=2), AugSpec(res=res, views=2, randaug=False)
    pipes = {spec: build_pipeline(spec, batch), plain: build_pipeline(plain, batch)}

    def rate(label, sp, m, only=None):
        draws = batch_draws(sp, np.arange(batch), 0, 0)
        if only is not None:
            for d in draws:
                d["op"][:] = only
        p = pipes[sp]
        feed(p, sp, imgs, m, draws)
        p.run()
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            feed(p, sp, imgs, m, draws)
            p.run()
            n += batch
        print(f"{label:22s} {n / (time.perf_counter() - t):7.0f} images/s (2 views each)", flush=True)

    rate("crop + normalise only", plain, np.zeros(batch, np.float32))
    rate("RA graph, M = 0", spec, np.zeros(batch, np.float32))
    rate("RA graph, M ~ U(0,1)", spec, rng.random(batch).astype(np.float32))
    for i, op in enumerate(ro.OPS):
        rate(f"only {op.name}", spec, np.ones(batch, np.float32), only=i)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32)
