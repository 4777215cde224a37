"""Fused token log-probs (nanovalor/logprobs.py) against eager logits + fp32 log_softmax + gather: fwd + bwd.

    python bench/logprobs.py                # the CPU table; then the GPU tables when CUDA is present
    python bench/logprobs.py --entropy      # CPU: also the entropy=True rows
    python bench/logprobs.py --skip-cpu     # the GPU tables only (one self-contained run, under 5 minutes)

CPU: N = 4096, d = 256, V = 32000, fp32, T = 1: eager (token_logprobs_reference) against the chunked torch path.
Times are medians of interleaved repeats in one process (the machine is shared and noisy), as wall time and as
this process's CPU time. "Extra memory" is the peak resident memory above what the inputs hold, for one fwd + bwd
in a fresh subprocess per variant (VmHWM; malloc is told to hand blocks over 128 KiB straight back to the OS);
it includes the gradients dH and dW themselves (37 MB here). Targets: chunked <= 1/8 of eager's extra memory,
<= 1.3x its time.

GPU: N = 16384, d = 2048, V in {32000, 151936}, bf16, T = 1: eager, chunked torch, Liger's fused linear
cross-entropy (reduction="none", when liger_kernel is importable) and ours (Triton). Forward-only time (the old and
reference policy passes), fwd + bwd time (median of triton.testing.do_bench), peak extra memory over the inputs
(with and without the gradients), effective TFLOP/s = 8 N d V / (fwd + bwd time). Then bf16 accuracy against a
float64 oracle (CCE's criterion |ours - fp64| <= |eager bf16 - fp64| + 1e-2 elementwise; for the gradients,
whose size follows the upstream gradient, 1e-2 x their largest magnitude), and a sweep of a few
tile configurations for ours (copy the best into logprobs.CUDA_TILES). Targets: ours <= 1.0x eager time, <= 2 %
of eager's extra memory, >= 450 TFLOP/s at V = 151936 (the 790 TFLOP/s floor is 51.6 ms).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanovalor import logprobs  # noqa: E402
from nanovalor.logprobs import token_logprobs, token_logprobs_reference  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=3, help="CPU: timed runs per variant (after one warm-up)")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--entropy", action="store_true", help="CPU: also time entropy=True")
parser.add_argument("--skip-cpu", action="store_true")
parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement


def make_inputs(n, d, vocab, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen, device=device) * (3 / d ** 0.5)).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen, device=device)
    upstream = torch.randn(n, generator=gen, device=device)  # a per-token upstream gradient, as in GRPO
    return hidden, weight, targets, upstream


def cpu_variants(with_entropy):
    def eager(h, w, t):
        return token_logprobs_reference(h, w, t, entropy=with_entropy)

    def chunked(h, w, t):
        return token_logprobs(h, w, t, entropy=with_entropy, backend="torch")
    suffix = " +entropy" if with_entropy else ""
    return {"eager" + suffix: eager, "chunked torch" + suffix: chunked}


def fwd_bwd(fn, hidden, weight, targets, upstream):
    hidden.grad = weight.grad = None
    out = fn(hidden, weight, targets)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(list(outs), [upstream] * len(outs))


CPU_SHAPE = dict(n=4096, d=256, vocab=32000)


def memory_child(name):
    """Runs in a fresh process: peak resident bytes of one fwd + bwd above the resident set before it."""
    torch.set_num_threads(args.threads)
    variants = {**cpu_variants(False), **cpu_variants(True)}
    fn = variants[name]
    fwd_bwd(fn, *make_inputs(8, 16, 64, torch.float32, "cpu"))  # torch's one-off allocations happen here
    inputs = make_inputs(**CPU_SHAPE, dtype=torch.float32, device="cpu")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current resident set
        f.write("5")
    before = proc_status("VmRSS")
    fwd_bwd(fn, *inputs)
    print(proc_status("VmHWM") - before)


def proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(name):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", name,
                              "--threads", str(args.threads)], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])
    except (subprocess.CalledProcessError, ValueError, IndexError) as err:
        print(f"memory measurement of {name} failed: {err}", file=sys.stderr)
        return None


def cpu_bench():
    torch.set_num_threads(args.threads)
    variants = cpu_variants(False)
    if args.entropy:
        variants.update(cpu_variants(True))
    inputs = make_inputs(**CPU_SHAPE, dtype=torch.float32, device="cpu")
    wall, cpu = {k: [] for k in variants}, {k: [] for k in variants}
    for rep in range(args.repeats + 1):  # interleaved, so that load from other users hits every variant alike
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd(fn, *inputs)
            if rep:  # the first round is a warm-up
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    n, d, vocab = CPU_SHAPE.values()
    print(f"\nCPU, {torch.get_num_threads()} threads: N={n} d={d} V={vocab} fp32 T=1, fwd+bwd, "
          f"median of {args.repeats} interleaved runs; extra memory = peak RSS over the inputs (incl. dH, dW)")
    print("| variant | wall s | vs eager | CPU s | vs eager | extra memory MB | vs eager |")
    print("|---|---|---|---|---|---|---|")
    base = {}
    for name in variants:
        w, c, mem = statistics.median(wall[name]), statistics.median(cpu[name]), measure_memory(name)
        key = "entropy" if "entropy" in name else "plain"
        base.setdefault(key, (w, c, mem))
        bw, bc, bm = base[key]
        mem_cells = ("n/a", "n/a") if mem is None or bm is None else (f"{mem / 2**20:.0f}", f"{mem / bm:.3f}x")
        print(f"| {name} | {w:.2f} | {w / bw:.2f}x | {c:.2f} | {c / bc:.2f}x | {mem_cells[0]} | {mem_cells[1]} |")


# ----------------------------------------------------------------------------------------------------------------
# GPU

GPU = "cuda"
GPU_SHAPE = dict(n=16384, d=2048)
VOCABS = (32000, 151936)
ACCURACY_SHAPE = dict(n=2048, d=2048, vocab=151936)

def gpu_variants():
    variants = {
        "eager": lambda h, w, t: token_logprobs_reference(h, w, t),
        "chunked torch": lambda h, w, t: token_logprobs(h, w, t, backend="torch"),
    }
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        variants["liger FLCE"] = lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none")
    except ImportError:
        print("liger_kernel is not importable here: no Liger row")
    variants["ours (triton)"] = lambda h, w, t: token_logprobs(h, w, t, backend="triton")
    return variants


def gpu_time_and_memory(fn, hidden, weight, targets, upstream):
    from triton.testing import do_bench
    with torch.no_grad():
        fwd = do_bench(lambda: fn(hidden, weight, targets), return_mode="median")
    full = do_bench(lambda: fwd_bwd(fn, hidden, weight, targets, upstream), grad_to_none=[hidden, weight],
                    return_mode="median")
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fwd_bwd(fn, hidden, weight, targets, upstream)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    grads = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    hidden.grad = weight.grad = None
    return fwd, full, extra, extra - grads


def gpu_bench():
    import triton
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    n, d = GPU_SHAPE["n"], GPU_SHAPE["d"]
    for vocab in VOCABS:
        inputs = make_inputs(n, d, vocab, torch.bfloat16, GPU)
        flop = 8 * n * d * vocab
        print(f"\nN={n} d={d} V={vocab} bf16 T=1 (floor at 790 TFLOP/s: {flop / 790e12 * 1e3:.1f} ms fwd+bwd)")
        print("| variant | fwd ms | fwd+bwd ms | vs eager | TFLOP/s (8NdV) | extra GB | workspace GB (w/o dH, dW) "
              "| extra vs eager |")
        print("|---|---|---|---|---|---|---|---|")
        eager = None
        for name, fn in gpu_variants().items():
            try:
                fwd, full, extra, workspace = gpu_time_and_memory(fn, *inputs)
            except torch.OutOfMemoryError:
                print(f"| {name} | out of memory | | | | | | |")
                torch.cuda.empty_cache()
                continue
            eager = eager or (full, extra)
            print(f"| {name} | {fwd:.2f} | {full:.2f} | {full / eager[0]:.2f}x | {flop / full / 1e9:.0f} | "
                  f"{extra / 1e9:.3f} | {workspace / 1e9:.3f} | {100 * extra / eager[1]:.2f} % |")
            torch.cuda.empty_cache()
        del inputs
        torch.cuda.empty_cache()
    gpu_accuracy(**ACCURACY_SHAPE)
    gpu_tile_sweep(**GPU_SHAPE, vocab=VOCABS[-1])


def gpu_accuracy(n, d, vocab):
    """bf16 inputs; float64 oracle on the same (rounded) inputs; ours and eager bf16 against it."""
    hidden, weight, targets, _ = make_inputs(n, d, vocab, torch.bfloat16, GPU, seed=1)
    gen = torch.Generator(device=GPU).manual_seed(2)
    g_logp, g_ent = torch.randn(n, generator=gen, device=GPU), torch.randn(n, generator=gen, device=GPU)

    def run(fn, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        logp, ent = fn(h, w)
        torch.autograd.backward([logp, ent], [g_logp.to(logp.dtype), g_ent.to(ent.dtype)])
        return [x.double() for x in (logp.detach(), ent.detach(), h.grad, w.grad)]
    oracle = run(lambda h, w: token_logprobs_reference(h, w, targets, entropy=True), hidden.double(), weight.double())
    eager = run(lambda h, w: token_logprobs_reference(h, w, targets, entropy=True), hidden, weight)
    ours = run(lambda h, w: token_logprobs(h, w, targets, entropy=True, backend="triton"), hidden, weight)
    print(f"\nbf16 accuracy, N={n} d={d} V={vocab}, against float64: max abs error, and elements where ours is "
          f"worse than eager bf16 by more than 1e-2 (values, in nats) or 1e-2 x max|gradient| (gradients)")
    print("| output | ours | eager bf16 | elements over | verdict |")
    print("|---|---|---|---|---|")
    for name, o, e, r in zip(("log p", "entropy", "d hidden", "d weight"), ours, eager, oracle):
        tol = 1e-2 if name in ("log p", "entropy") else 1e-2 * r.abs().max()
        bad = ((o - r).abs() > (e - r).abs() + tol).sum().item()
        print(f"| {name} | {(o - r).abs().max():.2e} | {(e - r).abs().max():.2e} | {bad} | "
              f"{'PASS' if bad == 0 else 'FAIL'} |")
    del oracle, eager, ours
    torch.cuda.empty_cache()


SWEEP = [dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4),
         dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3),
         dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=4, num_stages=4),
         dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=4, num_stages=4),
         dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=128, num_warps=8, num_stages=3)]


def gpu_tile_sweep(n, d, vocab):
    from triton.testing import do_bench
    hidden, weight, targets, upstream = make_inputs(n, d, vocab, torch.bfloat16, GPU)
    default = dict(logprobs.CUDA_TILES)
    fn = lambda h, w, t: token_logprobs(h, w, t, backend="triton")  # noqa: E731
    print(f"\ntile sweep for ours, N={n} d={d} V={vocab} bf16 (default: {default})")
    print("| BLOCK_N | BLOCK_V | BLOCK_D | warps | stages | fwd ms | fwd+bwd ms | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for config in SWEEP:
        logprobs.CUDA_TILES.update(config)
        try:
            with torch.no_grad():
                fwd = do_bench(lambda: fn(hidden, weight, targets), return_mode="median")
            full = do_bench(lambda: fwd_bwd(fn, hidden, weight, targets, upstream), grad_to_none=[hidden, weight],
                            return_mode="median")
            cells = f"{fwd:.2f} | {full:.2f} | {8 * n * d * vocab / full / 1e9:.0f}"
        except Exception as err:  # e.g. out of shared memory for a large tile: report it, try the next
            cells = f"failed: {type(err).__name__} | | "
        print(f"| {config['BLOCK_N']} | {config['BLOCK_V']} | {config['BLOCK_D']} | {config['num_warps']} | "
              f"{config['num_stages']} | {cells} |")
    logprobs.CUDA_TILES.clear()
    logprobs.CUDA_TILES.update(default)


if __name__ == "__main__":
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
    else:
        if not args.skip_cpu:
            cpu_bench()
        if torch.cuda.is_available():
            start = time.perf_counter()
            gpu_bench()
            print(f"\nGPU tables took {time.perf_counter() - start:.0f} s")
        else:
            print("\nno CUDA device here: the GPU tables are skipped")
