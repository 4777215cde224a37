"""Fused token log-probs (nanovalor/logprobs.py) against a float64 torch oracle and hand-computed numbers.

    python -m pytest -q tests/test_logprobs.py

Without a GPU the Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it before
triton is imported), with its tiny interpreter tiles: V = 1031 is not a multiple of the 256-wide vocabulary tile,
d = 48 is not a multiple of the 32-wide K step, and N = 37 is not a multiple of the 16-row block. With a GPU the
same tests run the compiled kernel on CUDA tensors. The torch path's chunk is shrunk so that it, too, walks several
vocabulary chunks (one of them partial).
"""
import math

import pytest
import torch

from nanovalor import logprobs
from nanovalor.logprobs import token_logprobs, token_logprobs_reference

BACKENDS = ["torch", "triton"]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the interpreter


def device_of(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"
# one rounding of a value of this dtype, as a relative error (fp32: what the issue asks for)
RTOL = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.fixture(autouse=True)
def small_torch_chunks(monkeypatch):  # (conftest.py runs the suite on one torch thread)
    monkeypatch.setattr(logprobs, "TORCH_CHUNK_ELEMENTS", 37 * 110)  # N = 37: 10 chunks of 110 columns, V = 1031


def make_inputs(n, vocab, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(vocab, d, generator=gen) / math.sqrt(d) * 3).to(dtype)  # logits of std ~3
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[0] = vocab - 1  # the last real column, inside the padded last tile
    targets[-1] = 0
    return hidden, weight, targets


def run(fn, hidden, weight, targets, temperature, g_logp, g_ent, **kw):
    """Values, and gradients for upstream gradients g_logp and g_ent (None: that output is not used).

    The upstream gradients go in as given (strided views here), as autograd hands over a masked view's gradient.
    """
    device = device_of(kw.get("backend"))
    hidden = hidden.detach().to(device, copy=True).requires_grad_()
    weight = weight.detach().to(device, copy=True).requires_grad_()
    logp, ent = fn(hidden, weight, targets.to(device), temperature, entropy=True, **kw)
    used = [(out, strided_on(g.to(out.dtype), device)) for out, g in ((logp, g_logp), (ent, g_ent)) if g is not None]
    torch.autograd.backward([out for out, _ in used], [g for _, g in used])
    return logp.detach().cpu(), ent.detach().cpu(), hidden.grad.cpu(), weight.grad.cpu()


def strided_on(g, device):
    """g on device, still a strided view (a plain .to() would hand over a contiguous copy)."""
    return g if device == "cpu" else torch.stack([g, g], 1).to(device)[:, 0]


def oracle(hidden, weight, targets, temperature, g_logp, g_ent):
    """The same (possibly half-precision) inputs, computed in float64."""
    return run(token_logprobs_reference, hidden.double(), weight.double(), targets, temperature,
               None if g_logp is None else g_logp.double(), None if g_ent is None else g_ent.double())


def close(actual, expected, rtol, what):
    """Gradients: elementwise, relative to the value and to the tensor's scale (tiny entries are noise)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


def close_values(actual, expected, what):
    """log p and entropy per token: fp32 relative error <= 1e-5 of each value (1e-6 absolute near zero)."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def upstream(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    g_logp = torch.randn(2 * n, generator=gen)[::2]  # strided, as a masked view hands it over
    g_ent = torch.randn(n, 3, generator=gen)[:, 1]
    assert n == 1 or not (g_logp.is_contiguous() or g_ent.is_contiguous())
    return g_logp, g_ent


# --- hand-computed numbers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_hand_computed(backend, temperature):
    # logits z = (0, ln 2, ln 5) for one token, target 2. At T = 1: p = (1, 2, 5)/8; at T = 0.5 (z doubled):
    # p = (1, 4, 25)/30.
    device = device_of(backend)
    hidden = torch.tensor([[1.0, 0.0]], device=device, requires_grad=True)
    weight = torch.tensor([[0.0, 3.0], [math.log(2), -1.0], [math.log(5), 2.0]], device=device, requires_grad=True)
    targets = torch.tensor([2], device=device)
    weights = [1, 2, 5] if temperature == 1.0 else [1, 4, 25]
    total = sum(weights)
    p = [w / total for w in weights]
    expected_logp = math.log(p[2])
    expected_ent = -sum(q * math.log(q) for q in p)
    fn = token_logprobs_reference if backend == "reference" else (
        lambda *a, **k: token_logprobs(*a, **k, backend=backend))
    logp, ent = fn(hidden, weight, targets, temperature, entropy=True)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (1,)
    assert abs(logp.item() - expected_logp) < 1e-6 and abs(ent.item() - expected_ent) < 1e-6
    logp.sum().backward()  # an expanded (stride 0) upstream gradient
    # d logp / dz = onehot - p; dz/dH = W^T / T, dz/dW_j = H / T
    g = [-p[0], -p[1], 1 - p[2]]
    expected_dh = [sum(g[j] * weight[j, k].item() for j in range(3)) / temperature for k in range(2)]
    expected_dw = [[g[j] / temperature, 0.0] for j in range(3)]
    torch.testing.assert_close(hidden.grad.cpu(), torch.tensor([expected_dh]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight.grad.cpu(), torch.tensor(expected_dw), rtol=1e-6, atol=1e-6)


def test_reference_matches_torch_cross_entropy_and_categorical():
    """The plain reference against two torch routines that share none of its code."""
    hidden, weight, targets = make_inputs(37, 1031, 48, torch.float32)
    logp, ent = token_logprobs_reference(hidden, weight, targets, 0.7, entropy=True)
    logits = (hidden @ weight.T) / 0.7
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(logp, -nll, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, torch.distributions.Categorical(logits=logits).entropy(), rtol=1e-5, atol=1e-5)


# --- both fused paths against the float64 oracle ----------------------------------------------------------------

FP32_CASES = [(n, v, d, t) for n in (1, 7, 37) for v in (1000, 1031) for d in (16, 48) for t in (1.0, 0.7)]
HALF_CASES = [(1, 1031, 48, 0.7), (7, 1000, 16, 1.0), (37, 1031, 48, 1.0)]


def check_against_oracle(backend, n, vocab, d, temperature, dtype):
    hidden, weight, targets = make_inputs(n, vocab, d, dtype, seed=n * vocab + d)
    g_logp, g_ent = upstream(n)
    got = run(token_logprobs, hidden, weight, targets, temperature, g_logp, g_ent, backend=backend)
    want = oracle(hidden, weight, targets, temperature, g_logp, g_ent)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[2].dtype == got[3].dtype == dtype
    if backend == "torch" and dtype != torch.float32:
        # The torch path keeps eager semantics: the logits are rounded to the input dtype before the fp32 softmax,
        # so it is compared with the eager reference in that dtype (one logit rounding apart at most).
        want = run(token_logprobs_reference, hidden, weight, targets, temperature, g_logp, g_ent)
        logit_scale = (hidden.float() @ weight.float().T).abs().max().item() / temperature
        for name, a, b in zip(("logp", "entropy"), got[:2], want[:2]):
            torch.testing.assert_close(a, b, rtol=0, atol=2 * RTOL[dtype] * logit_scale, msg=lambda m: f"{name}: {m}")
        rtol = 4 * RTOL[dtype]
    else:
        # Triton upcasts half inputs right after loading and accumulates in fp32: its values are fp32-exact.
        close_values(got[0], want[0], "logp")
        close_values(got[1], want[1], "entropy")
        rtol = RTOL[dtype]
    close(got[2], want[2], rtol, "d hidden")
    close(got[3], want[3], rtol, "d weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,vocab,d,temperature", FP32_CASES)
def test_fp32_against_float64(backend, n, vocab, d, temperature):
    check_against_oracle(backend, n, vocab, d, temperature, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,vocab,d,temperature", HALF_CASES)
def test_half_against_float64(backend, dtype, n, vocab, d, temperature):
    check_against_oracle(backend, n, vocab, d, temperature, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["logp", "entropy", "both"])
def test_backward_through_logp_only_entropy_only_and_both(backend, used):
    hidden, weight, targets = make_inputs(37, 1031, 48, torch.float32, seed=3)
    g_logp, g_ent = upstream(37, seed=4)
    g_logp, g_ent = (g_logp if used != "entropy" else None), (g_ent if used != "logp" else None)
    got = run(token_logprobs, hidden, weight, targets, 0.7, g_logp, g_ent, backend=backend)
    want = oracle(hidden, weight, targets, 0.7, g_logp, g_ent)
    close(got[2], want[2], 1e-5, "d hidden")
    close(got[3], want[3], 1e-5, "d weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1000.0, -1000.0, 1e5])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_large_common_logit_offset(backend, offset, temperature):
    """Every logit of a token shifted by a constant: results must not change (softmax is shift-invariant).

    -1000 makes every logit negative (a running max that starts at 0 instead of -inf breaks there); +1000 and
    +1e5 catch a target logit or an E_p[z] taken against a rounded LSE (the fp32 spacing is 6e-5 at 1000, but
    8e-3 at 1e5, well over 1e-5 relative). Inputs are multiples of 1/8, so the fp32 logits are exact and any
    error is the algorithm's own; T = 0.5 keeps them exact.
    """
    n, vocab, d = 37, 1031, 48
    gen = torch.Generator().manual_seed(5)
    hidden = torch.cat([torch.randint(-8, 9, (n, d - 1), generator=gen) / 8, torch.ones(n, 1)], 1)
    weight = torch.cat([torch.randint(-8, 9, (vocab, d - 1), generator=gen) / 8, torch.full((vocab, 1), offset)], 1)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    g_logp, g_ent = upstream(n, seed=6)
    got = run(token_logprobs, hidden, weight, targets, temperature, g_logp, g_ent, backend=backend)
    want = oracle(hidden, weight, targets, temperature, g_logp, g_ent)
    close_values(got[0], want[0], "logp")
    close_values(got[1], want[1], "entropy")
    # dH[:, -1] = offset * sum_j g_ij, an exact zero times 1000 in any precision: not a meaningful comparison
    close(got[2][:, :-1], want[2][:, :-1], 1e-5, "d hidden")
    close(got[3], want[3], 1e-5, "d weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_lm_head_or_frozen_hidden(backend):
    """Only what requires grad gets one (the visual stage trains the projector under a frozen LM head)."""
    hidden, weight, targets = make_inputs(7, 1031, 16, torch.float32, seed=10)
    g_logp, _ = upstream(7)
    want = oracle(hidden, weight, targets, 1.0, g_logp, None)
    device = device_of(backend)
    for train_hidden in (True, False):
        h = hidden.to(device, copy=True).requires_grad_(train_hidden)
        w = weight.to(device, copy=True).requires_grad_(not train_hidden)
        logp = token_logprobs(h, w, targets.to(device), backend=backend)
        torch.autograd.backward(logp, g_logp.to(device))
        assert (h.grad is None) != train_hidden and (w.grad is None) == train_hidden
        close((h.grad if train_hidden else w.grad).cpu(), want[2] if train_hidden else want[3], 1e-5, "gradient")


def test_torch_chunked_path_equals_plain_reference():
    hidden, weight, targets = make_inputs(37, 1031, 48, torch.float32, seed=7)
    g_logp, g_ent = upstream(37, seed=8)
    got = run(token_logprobs, hidden, weight, targets, 0.7, g_logp, g_ent, backend="torch")
    want = run(token_logprobs_reference, hidden, weight, targets, 0.7, g_logp, g_ent)
    for name, a, b in zip(("logp", "entropy", "d hidden", "d weight"), got, want):
        close(a, b, 2e-6, name)


def test_triton_split_merge_is_deterministic_and_split_independent(monkeypatch):
    hidden, weight, targets = (x.to(TRITON_DEVICE) for x in make_inputs(37, 1031, 48, torch.float32, seed=9))
    first = token_logprobs(hidden, weight, targets, 0.7, entropy=True, backend="triton")
    again = token_logprobs(hidden, weight, targets, 0.7, entropy=True, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # one split per row block (the whole vocabulary in one program's loop) against the default several splits
    monkeypatch.setitem(logprobs._tiles(hidden.device), "PROGRAMS", 1)
    single = token_logprobs(hidden, weight, targets, 0.7, entropy=True, backend="triton")
    for a, b in zip(first, single):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --- dispatch and errors ----------------------------------------------------------------------------------------

def test_auto_uses_the_torch_path_on_cpu(monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton kernel ran for CPU tensors under backend='auto'")
    monkeypatch.setattr(logprobs, "_triton_forward", fail)
    hidden, weight, targets = make_inputs(7, 1000, 16, torch.float32)
    with torch.no_grad():  # the old / reference policy pass
        logp = token_logprobs(hidden, weight, targets)
    close_values(logp, token_logprobs_reference(hidden.double(), weight.double(), targets), "logp")


def test_empty_batch():
    hidden, weight = torch.zeros(0, 16, requires_grad=True), torch.randn(1000, 16)
    logp, ent = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), entropy=True)
    assert logp.shape == ent.shape == (0,) and logp.dtype == torch.float32


@pytest.mark.parametrize("change,message", [
    (dict(hidden=torch.randn(4, 8)), "same d"),
    (dict(weight=torch.randn(50, 16, dtype=torch.float64)), "share one dtype"),
    (dict(targets=torch.tensor([0, 1, 50, 2])), r"targets must lie in \[0, 50\)"),
    (dict(targets=torch.tensor([0, 1, -1, 2])), r"targets must lie in \[0, 50\)"),
    (dict(targets=torch.zeros(3, dtype=torch.long)), "targets of shape"),
    (dict(targets=torch.zeros(4)), "integer targets"),
    (dict(temperature=0.0), "temperature"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_input_gets_a_clear_error(change, message):
    args = dict(hidden=torch.randn(4, 16), weight=torch.randn(50, 16), targets=torch.tensor([0, 1, 2, 49]),
                temperature=1.0, backend="auto")
    args.update(change)
    with pytest.raises(ValueError, match=message):
        token_logprobs(**args)
