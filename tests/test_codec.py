"""The codec on one process: error bounds, unbiased stochastic rounding, error feedback."""

import pytest
import torch

from dat_ds.comm.codec import Codec, ErrorFeedback


def block_scales(x: torch.Tensor, c: Codec) -> torch.Tensor:
    return (x.reshape(-1, c.block).abs().amax(1) / c.qmax).repeat_interleave(c.block)


@pytest.fixture
def grad():
    g = torch.Generator().manual_seed(0)
    # heavy-tailed, with an all-zero block and a block of one outlier: the cases a block scale must survive
    x = torch.randn(64 * 256, generator=g) * torch.rand(64 * 256, generator=g) ** 4
    x[256:512] = 0
    x[1024:1280] = 1e-3
    x[1100] = 50.0
    return x


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_roundtrip_within_block_scale_bound(grad, bits, rounding):
    c = Codec(bits=bits, block=256, rounding=rounding)
    buf = c.encode(grad)
    assert buf.dtype == torch.uint8 and buf.numel() == c.encoded_nbytes(grad.numel())
    assert buf.numel() == grad.numel() * bits // 8 + 4 * grad.numel() // 256
    err = (c.decode(buf, grad.numel()) - grad).abs()
    bound = block_scales(grad, c) * (0.5 if rounding == "nearest" else 1.0)
    # plus fp32 arithmetic in x/scale and q*scale: a few ulps of |x| (matters at 16 bits, where q reaches 32767)
    fp32 = 4 * torch.finfo(torch.float32).eps * grad.abs()
    assert (err <= bound + fp32 + 1e-12).all()
    assert err[256:512].max() == 0, "an all-zero block stays exactly zero"


def test_32_bits_is_the_identity(grad):
    c = Codec(bits=32)
    assert torch.equal(c.roundtrip(grad), grad)


def test_decode_accumulates(grad):
    c = Codec(bits=8)
    buf = c.encode(grad)
    acc = torch.ones_like(grad)
    c.decode(buf, grad.numel(), out=acc, accumulate=True)
    assert torch.allclose(acc, 1 + c.decode(buf, grad.numel()))


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits):
    # Values sit at fixed fractions of a quantization step, where nearest rounding is biased by up to half a step.
    c = Codec(bits=bits, block=256, rounding="stochastic")
    x = torch.linspace(-1, 1, 512)
    x[0], x[256] = -1.0, 1.0  # pin each block's scale to 1/qmax
    step = 1.0 / c.qmax
    draws = 4000
    g = torch.Generator().manual_seed(1)
    mean = torch.zeros_like(x)
    for _ in range(draws):
        mean += c.roundtrip(x, generator=g)
    mean /= draws
    # Each draw errs by a Bernoulli step (variance <= step^2 / 4): the mean of N draws has sd <= step / (2 sqrt N).
    # 5 sd over 512 values leaves a false-alarm chance below 1e-4.
    tol = 5 * step / (2 * draws**0.5)
    assert (mean - x).abs().max() < tol
    nearest = Codec(bits=bits, block=256).roundtrip(x)
    assert (nearest - x).abs().max() > 10 * tol, "the test can tell a biased rounding apart"


def test_error_feedback_bounds_the_accumulated_error():
    c = Codec(bits=4, block=256)
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(1024, generator=g) * 0.01
    grad[::256] = 1.0  # big values in each block: the small ones round to zero without feedback
    ef = ErrorFeedback()
    sent_plain = torch.zeros_like(grad)
    sent_ef = torch.zeros_like(grad)
    steps = 200
    for _ in range(steps):
        sent_plain += c.roundtrip(grad)
        target = ef.add_residual("k", grad)
        out = c.roundtrip(target)
        ef.store("k", target, out)
        sent_ef += out
    plain_err = (sent_plain - steps * grad).abs().max()
    ef_err = (sent_ef - steps * grad).abs().max()
    step = 1.0 / c.qmax
    assert ef_err <= step, "with feedback the total error stays within one quantization step"
    assert plain_err > 20 * step, "without it the error grows with the number of steps"
    ef.reset()
    assert not ef.residuals


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_decode_mean_equals_the_mean_of_decodes(grad, bits):
    c = Codec(bits=bits)
    parts = [grad, grad.flip(0) * 3, -grad]
    bufs = torch.stack([c.encode(p) for p in parts])
    ref = sum(c.decode(b, grad.numel()) for b in bufs) / 3
    out = c.decode_mean(bufs, grad.numel(), torch.empty_like(grad))
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)


def test_compile_failure_warns_once_and_out_of_memory_is_not_hidden(monkeypatch):
    from dat_ds.comm import codec as cm

    def broken(*a):
        raise RuntimeError("no compiler here")

    def oom(*a):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(cm, "_compile_failed", False)
    monkeypatch.setattr(cm, "_kernel", lambda name, numel: oom)
    with pytest.raises(torch.OutOfMemoryError):
        cm._run("enc8", 1 << 21, torch.zeros(4, 512), None, 127.0)
    monkeypatch.setattr(cm, "_kernel", lambda name, numel: broken)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .* eager kernels"):
        q, scale = cm._run("enc8", 1 << 21, torch.ones(4, 512), None, 127.0)
    assert cm._compile_failed and q.dtype == torch.int8


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_compiled_kernels_match_eager_on_every_path(monkeypatch, bits):
    """Above COMPILE_MIN_NUMEL the kernels run through torch.compile; every path must give the eager kernels'
    bytes and values: nearest and stochastic encoding (the same generator state), decoding into a buffer and
    accumulating into one, and the owner's mean of several uploads."""
    import dat_ds.comm.codec as cm

    n = cm.COMPILE_MIN_NUMEL
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, n, generator=g) * torch.rand(2, n, generator=g) ** 2
    base = torch.randn(n, generator=g)

    def run():
        out = []
        for rounding in ("nearest", "stochastic"):
            c = Codec(bits=bits, rounding=rounding)
            gen = torch.Generator().manual_seed(7)
            enc = torch.stack([c.encode(x[0], generator=gen), c.encode(x[1], generator=gen)])
            out += [enc, c.decode(enc[0], n), c.decode(enc[1], n, out=base.clone(), accumulate=True),
                    c.decode_mean(enc, n, torch.empty(n))]  # fmt: skip
        return out

    monkeypatch.setenv("DAT_DS_COMPILE_CODEC", "0")
    eager = run()
    monkeypatch.setenv("DAT_DS_COMPILE_CODEC", "1")
    monkeypatch.setattr(cm, "_compile_failed", False)
    compiled = run()
    assert not cm._compile_failed
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ the paper's quantizer (comm.codec = "qsgd")


def _official_quantize(g: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The official DAT code's RandomQuantizer (quantization.py, b = 7 magnitude bits + a sign), written out here
    from its formulas: level l = floor(|g| s / ||g||), up with probability s |g| / ||g|| - l; decoded
    ||g|| sign(g) xi / s. The Bernoulli draw uses uniform noise so that it can share a stream."""
    s = 127.0
    norm = g.norm()
    a = g.abs() / norm * s
    lo = torch.floor(a)
    xi = lo + (torch.rand(g.shape, generator=gen) < a - lo).float()
    return norm * torch.sign(g) * xi / s


def test_qsgd_matches_the_official_quantizer_in_distribution():
    """Same levels, same mean, same spread as the official code's quantizer, tensor by tensor."""
    from dat_ds.comm.codec import QSGDCodec, Segments

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=g) * torch.rand(4096, generator=g) ** 3
    sizes = [64, 4000, 32]
    seg = Segments(sizes)
    c = QSGDCodec(bits=8)
    ours = torch.stack([c.roundtrip(x, generator=g, segments=seg) for _ in range(400)])
    ref = torch.stack([torch.cat([_official_quantize(p, g) for p in x.split(sizes)]) for _ in range(400)])
    levels = torch.cat([p.norm().expand(len(p)) for p in x.split(sizes)]) / 127
    # every decoded value is a whole number of its tensor's levels, within one level of the input
    k = ours / levels
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert ((ours - x).abs() < levels * 1.0001).all()
    # the per-value means and variances of the two agree within sampling error
    sd = levels / 2 / 400**0.5  # a Bernoulli step's sd is at most level/2
    assert ((ours.mean(0) - ref.mean(0)).abs() < 6 * sd * 2**0.5 + 1e-9).all()
    var_ours, var_ref = ours.var(0).sum(), ref.var(0).sum()
    assert abs(var_ours / var_ref - 1) < 0.1


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_qsgd_is_unbiased_with_its_known_variance(bits):
    """Mean of many decodes -> the input; the mean squared error -> sum_i (norm/s)^2 p_i (1 - p_i), which QSGD's
    Lemma 3.1 bounds by min(d / s^2, sqrt(d) / s) norm^2."""
    from dat_ds.comm.codec import QSGDCodec, Segments

    c = QSGDCodec(bits=bits)
    s = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2000, generator=g) * torch.rand(2000, generator=g) ** 2
    sizes = [1200, 800]
    seg = Segments(sizes)
    draws = 3000
    total, sq = torch.zeros_like(x, dtype=torch.float64), torch.zeros(len(sizes), dtype=torch.float64)
    for _ in range(draws):
        e = (c.roundtrip(x, generator=g, segments=seg) - x).double()
        total += e
        sq += torch.stack([p.pow(2).sum() for p in e.split(sizes)])
    levels = torch.cat([p.norm().expand(len(p)) for p in x.split(sizes)]).double() / s
    # unbiased: each value's mean error within 5 sd of 0 (sd of a Bernoulli step <= level / 2)
    assert ((total / draws).abs() <= 5 * levels / 2 / draws**0.5 + 1e-12).all()
    # variance: the exact expectation, per tensor
    for i, p in enumerate(x.split(sizes)):
        lvl = p.double().norm() / s
        frac = p.double().abs() / lvl - torch.floor(p.double().abs() / lvl)
        expected = (lvl**2 * frac * (1 - frac)).sum()
        assert abs(sq[i] / draws / expected - 1) < 0.08, (bits, i, float(sq[i] / draws), float(expected))
        d, norm2 = len(p), p.double().norm() ** 2
        assert expected <= min(d / s**2, d**0.5 / s) * norm2


def test_qsgd_error_is_orders_above_the_block_codec_on_a_large_tensor():
    """The fidelity note: on one large tensor the paper's per-tensor scale is far noisier than dat-ds's blocks."""
    from dat_ds.comm.codec import QSGDCodec

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1 << 20, generator=g)
    q = QSGDCodec(bits=8).roundtrip(x, generator=g)
    b = Codec(bits=8, block=512).roundtrip(x)
    rel_q = ((q - x).norm() / x.norm()) ** 2
    rel_b = ((b - x).norm() / x.norm()) ** 2
    assert rel_q > 1.0 and rel_b < 1e-3


def test_qsgd_wire_layout_and_zero_tensors():
    from dat_ds.comm.codec import QSGDCodec, Segments

    c = QSGDCodec(bits=4)
    x = torch.zeros(100)
    x[50:] = torch.linspace(-1, 1, 50)
    seg = Segments([50, 50], slots=3)
    buf = c.encode(x, segments=seg, generator=torch.Generator().manual_seed(0))
    assert buf.numel() == 4 * 3 + 100 // 2 == c.encoded_nbytes(100, seg)
    y = c.decode(buf, 100, segments=seg)
    assert torch.equal(y[:50], torch.zeros(50)), "an all-zero tensor decodes to zeros"
    with pytest.raises(ValueError, match="segments cover"):
        c.encode(torch.zeros(10), segments=seg)
