"""The per-sample arithmetic of eqs. 8-9, written once as plain scalar functions.

`kernels/cpu.py` compiles them with `njit` and `kernels/cuda.py` with `cuda.jit(device=True)`, so
the CPU and CUDA kernels cannot drift apart; with the JIT off they run as ordinary Python.
"""


def ema_update(prev, lt, seen, beta):
    """eq. 8: L^m = beta * L^m_prev + (1 - beta) * L_t; a sample's first observation initialises it."""
    return beta * prev + (1.0 - beta) * lt if seen else lt


def magnitude(v, mean, spread):
    """eq. 9 in BCL's form: z = (L - mean)/std, M = z / max|z| / 2 + 1/2, so M is in [0, 1].

    The std cancels: z / max|z| = (L - mean) / max|L - mean| = (L - mean) / spread. The paper
    divides by max(L - mean), which can push M below 0; BCL's code does this instead. When every
    seen loss is equal (spread 0), M = 0.5.
    """
    if spread > 0:
        return min(max((v - mean) / spread / 2.0 + 0.5, 0.0), 1.0)
    return 0.5


def spread_of(mean, lo, hi):
    """max |L - mean| over the seen samples, from their min and max."""
    return max(hi - mean, mean - lo)


def rank_unit(r, n):
    """A rank r among n (0 = lowest) on [0, 1]: r / (n - 1); 0.5 when there is only one."""
    return r / (n - 1.0) if n > 1 else 0.5


def ranks_below(means, present, c):
    """How many present classes come before class c: a lower mean, or the same mean and a lower
    index (so ties are broken the way a stable sort breaks them)."""
    r = 0
    for j in range(means.shape[0]):
        if present[j] and (means[j] < means[c] or (means[j] == means[c] and j < c)):
            r += 1
    return r


def lol_step(level, correct, trials, accept, levels):
    """Ahn, Ko and Yun's level-of-learning rule (ICLR 2023, CUDA; their code: accept_rate 0.6):
    a class whose samples were classified correctly more than `accept` of the time goes one level
    up, otherwise one down, within [0, levels]. A class with no trials keeps its level."""
    if trials <= 0:
        return level
    step = 1 if correct / trials > accept else -1
    return min(max(level + step, 0), levels)


# How M (eq. 9) is summarised per shot group at each stage-2 epoch end: these quantiles over the
# group's samples, labelled p10 ... p90 (log.jsonl's memory records, m_by_group.png, TensorBoard).
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
QUANTILE_NAMES = tuple(f"p{round(100 * q)}" for q in QUANTILES)
