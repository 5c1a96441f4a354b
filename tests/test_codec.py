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


def test_compiled_4bit_kernels_match_eager(monkeypatch):
    # Above COMPILE_MIN_NUMEL the kernels run through torch.compile; they must give the eager kernels' bytes.
    import dat_ds.comm.codec as cm

    n = cm.COMPILE_MIN_NUMEL
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, n, generator=g) * torch.rand(2, n, generator=g) ** 2
    c = Codec(bits=4)

    def run():
        enc = torch.stack([c.encode(x[0]), c.encode(x[1])])
        return enc, c.decode(enc[0], n), c.decode_mean(enc, n, torch.empty(n))

    monkeypatch.setenv("DAT_DS_COMPILE_CODEC", "0")
    eager = run()
    monkeypatch.setenv("DAT_DS_COMPILE_CODEC", "1")
    monkeypatch.setattr(cm, "_compile_failed", False)
    compiled = run()
    assert not cm._compile_failed
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)
