"""Shared test helpers: the numerics rule, adapter-popularity distributions, weight factories, and the
"same computation in PyTorch at low precision" baselines the rule compares against.

Numerics rule (DESIGN.md "Numerics", flash-attention's rule): a kernel's output passes when

    max |out - ref_fp32| <= factor * max |torch_lowp - ref_fp32| + atol + rtol * max |ref_fp32|

with ``factor = 2``, ``ref_fp32`` the fp32 reference and ``torch_lowp`` the same computation done by PyTorch
in the low precision dtype. ``atol + rtol * max|ref|`` is the small floor for cases where PyTorch happens to
be exact (fp32 runs, all-zero deltas).

For an op that adds a delta to an output it does not own (``y += delta``: add_lora_, expand_), pass the
output's previous value as ``base``: the relative floor is then taken on the delta, ``rtol * max|ref - base|``
(a large ``base`` would otherwise widen it past a small delta), plus half a unit in the last place of the
output's dtype on ``max|ref|`` (the one rounding into y), and the rule refuses to judge a case whose allowed
error is not below half the delta's size: a kernel that adds nothing, the delta twice or three times has an
error of at least ``max|ref - base|``, so it can never pass.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from lora_kernels.weights import LoRAWeights

__all__ = [
    "DISTRIBUTIONS",
    "assert_close_rule",
    "check_ptxas_budget",
    "lowp_add_lora_",
    "lowp_expand_",
    "lowp_shrink",
    "make_ids",
    "make_weights",
    "random_ranks",
    "run_without_interpreter",
    "triton_aot_compile",
]

DISTRIBUTIONS = ("distinct", "uniform", "zipf", "identical", "skewed")

# Floor relative to max|ref|: ~8 ulp for fp32 (summation order differs from PyTorch's), ~0.1 ulp otherwise.
_RTOL_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_close_rule(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    torch_lowp: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = 1e-6,
    rtol: float | None = None,
    dtype: torch.dtype | None = None,
    name: str = "output",
    base: torch.Tensor | float | None = None,
) -> None:
    """Assert the numerics rule above (max norm over all elements; shapes must match).

    Args:
        out: the kernel's result (any float dtype).
        ref_fp32: the fp32 reference (the spec).
        torch_lowp: PyTorch's result for the same computation in the low precision dtype.
        factor: allowed multiple of PyTorch's error.
        atol, rtol: the floor; ``rtol`` defaults by ``dtype`` (fp32 1e-6, fp16 1e-4, bf16 1e-3).
        dtype: the precision the floor is for (default: ``torch_lowp.dtype``).
        name: used in the failure message.
        base: the value ``out`` held before the op added its delta (``y0``; ``0.0`` for an op that writes a
            fresh result, such as shrink's h). When given: the relative floor is ``rtol * max|ref - base|``
            plus ``unit roundoff(out.dtype) * max|ref|``, the delta must be nonzero, and the allowed error must
            be at most half of ``max|ref - base|`` (else the case cannot tell a wrong kernel from a right one
            and the assertion fails, blaming the test). ``base`` must be a tensor the reference did not write.
    """
    assert out.shape == ref_fp32.shape == torch_lowp.shape, (
        f"{name}: shapes differ: out {tuple(out.shape)}, ref {tuple(ref_fp32.shape)}, lowp {tuple(torch_lowp.shape)}")
    dtype = dtype or torch_lowp.dtype
    rtol = _RTOL_FLOOR.get(dtype, 1e-6) if rtol is None else rtol
    ref = ref_fp32.double()
    if ref.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the kernel output"
    err = (out.double() - ref).abs().max().item()
    err_lowp = (torch_lowp.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    if base is None:
        floor = atol + rtol * scale
    else:
        b = base.double() if isinstance(base, torch.Tensor) else torch.tensor(float(base), dtype=torch.float64)
        delta = (ref - b.to(ref.device)).abs().max().item()
        unit = torch.finfo(out.dtype).eps / 2 if out.dtype.is_floating_point else 0.0
        floor = atol + rtol * delta + unit * scale
    bound = factor * err_lowp + floor
    if base is not None:
        # The case must be able to fail: a no-op or a doubled delta is off by max|delta| somewhere.
        assert delta > 0, f"{name}: the reference adds nothing to base: this case cannot tell a no-op kernel"
        assert bound <= 0.5 * delta, (
            f"{name}: allowed error {bound:.3e} is not below half the delta's size {delta:.3e}: a kernel adding "
            f"nothing or twice the delta could pass (PyTorch {dtype} error {err_lowp:.3e}, floor {floor:.3e})")
    assert err <= bound, (
        f"{name}: max error {err:.3e} vs fp32 reference exceeds {factor} x PyTorch {dtype} error "
        f"{err_lowp:.3e} + floor {floor:.3e} (max|ref| = {scale:.3e})")


# ---- adapter ids -------------------------------------------------------------------------------------------
def make_ids(
    dist: str,
    T: int,
    n_adapters: int,
    frac_none: float = 0.0,
    generator: torch.Generator | None = None,
    *,
    zipf_alpha: float = 1.5,
    hot_fraction: float = 0.9,
) -> torch.Tensor:
    """Per-token adapter ids int32 [T] drawn from a Punica popularity distribution, with about
    ``frac_none * T`` tokens (rounded) set to -1. With ``frac_none < 1`` at least one token keeps an adapter
    (T > 0): a case meant to test served tokens never degenerates into the all -1 early exit; ``frac_none = 1``
    is the explicit all -1 batch.

    * ``distinct``: every token a different adapter (a random permutation, cycled when T > n_adapters).
    * ``uniform``: i.i.d. uniform over the adapters.
    * ``zipf``: i.i.d. with P(rank k) proportional to 1 / k^zipf_alpha over a random ranking of the adapters.
    * ``identical``: every token the same (random) adapter.
    * ``skewed``: one hot adapter takes ``hot_fraction`` of the tokens, the rest uniform over the others.
    """
    if not 0.0 <= frac_none <= 1.0:
        raise ValueError(f"frac_none: expected a fraction in [0, 1], got {frac_none!r}")
    g = generator
    if dist == "distinct":
        perm = torch.randperm(n_adapters, generator=g)
        ids = perm[torch.arange(T) % n_adapters]
    elif dist == "uniform":
        ids = torch.randint(0, n_adapters, (T,), generator=g)
    elif dist == "zipf":
        p = 1.0 / torch.arange(1, n_adapters + 1, dtype=torch.float64) ** zipf_alpha
        perm = torch.randperm(n_adapters, generator=g)
        ids = perm[torch.multinomial(p, T, replacement=True, generator=g)] if T else torch.zeros(0, dtype=torch.int64)
    elif dist == "identical":
        ids = torch.full((T,), int(torch.randint(0, n_adapters, (1,), generator=g)))
    elif dist == "skewed":
        hot = int(torch.randint(0, n_adapters, (1,), generator=g))
        ids = torch.randint(0, n_adapters, (T,), generator=g)
        is_hot = torch.rand(T, generator=g) < hot_fraction
        ids = torch.where(is_hot, torch.full_like(ids, hot), ids)
    else:
        raise ValueError(f"dist: expected one of {DISTRIBUTIONS}, got {dist!r}")
    ids = ids.to(torch.int32)
    n_none = round(frac_none * T)
    if n_none:
        idx = torch.randperm(T, generator=g)[:n_none]
        ids[idx if frac_none == 1.0 else idx[: T - 1]] = -1  # frac_none < 1: one token keeps its adapter
    return ids


def random_ranks(n: int, choices: Sequence[int] = (1, 8, 16, 33, 64, 128),
                 generator: torch.Generator | None = None) -> list:
    """``n`` ranks drawn uniformly from ``choices``."""
    idx = torch.randint(0, len(choices), (n,), generator=generator)
    return [int(choices[i]) for i in idx]


# ---- weights -----------------------------------------------------------------------------------------------
def make_weights(
    in_features: int,
    out_features: int | Sequence[int],
    ranks: Sequence[int | Sequence[int]],
    *,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    max_rank: int | None = None,
    max_adapters: int | None = None,
    capacity_rows: int | None = None,
    churn: bool = False,
    device: str | torch.device = "cpu",
) -> LoRAWeights:
    """A :class:`LoRAWeights` holding one adapter per entry of ``ranks`` (ids 0..len-1).

    ``ranks[i]`` is one rank, or one per slice. A ~ N(0, 1/in), B ~ N(0, 1/r) (unit-size deltas),
    scale = alpha / r with a random alpha in [0.5 r, 2 r]. ``churn=True`` first loads and removes decoy
    adapters so that the real ones land in freed, reused rows out of id order (rank-paged, not padded).
    """
    g = generator
    outs = (out_features,) if isinstance(out_features, int) else tuple(out_features)
    S = len(outs)
    rk = [(r,) * S if isinstance(r, int) else tuple(r) for r in ranks]
    n = len(rk)
    r_max = max_rank or max(max(r) for r in rk)
    N = max_adapters or n
    if capacity_rows is None and churn:
        capacity_rows = sum(max(r) for r in rk) + 2 * r_max
    w = LoRAWeights(in_features, outs, N, r_max, capacity_rows=capacity_rows, dtype=dtype, device=device)

    def factors(r):
        A = [torch.randn(ri, in_features, generator=g) / in_features ** 0.5 for ri in r]
        B = [torch.randn(o, ri, generator=g) / ri ** 0.5 for o, ri in zip(outs, r)]
        return (A[0], B[0]) if S == 1 else (A, B)

    if churn:
        # Decoys in the low slots/rows, freed in a scattered order: later adds reuse their rows.
        decoys = []
        for j in range(min(N, 3)):
            r = min(r_max, 1 + 7 * j)
            A, B = factors((r,) * S)
            decoys.append(w.add(A, B, adapter_id=N - 1 - j))
        for d in decoys[::2]:
            w.remove(d)
    order = list(range(n))
    if churn:
        order = order[::-1]  # high ids first: ids and row order disagree
    for i in order:
        if churn and i in w.loaded:
            w.remove(i)
        A, B = factors(rk[i])
        alpha = [float(ri) * float(0.5 + 1.5 * torch.rand(1, generator=g)) for ri in rk[i]]
        scale = [a / ri for a, ri in zip(alpha, rk[i])]
        w.add(A, B, scale=scale, adapter_id=i)
    return w


# ---- PyTorch at low precision (the baseline of the rule) ----------------------------------------------------
def _groups(ids: torch.Tensor):
    for i in torch.unique(ids).tolist():
        if i >= 0:
            yield i, (ids == i).nonzero().flatten()


def _slice_rank(w: LoRAWeights, i: int, s: int) -> int:
    return int(w.ranks[s, i])


def _factors(w: LoRAWeights, i: int, s: int):
    off = int(w.offsets[i])
    r = _slice_rank(w, i, s)
    c0, n = w.slice_cols[s], w.slice_outs[s]
    return w.a[s, off : off + r], w.b[off : off + r, c0 : c0 + n], float(w.scales[s, i])


def lowp_shrink(x: torch.Tensor, w: LoRAWeights, ids: torch.Tensor, r_cap: int, dtype: torch.dtype) -> torch.Tensor:
    """h [S, T, r_cap] computed by PyTorch in ``dtype`` (returned in ``dtype``)."""
    S, T = w.num_slices, x.shape[0]
    h = torch.zeros(S, T, r_cap, dtype=dtype)
    xd = x.to(dtype)
    for i, toks in _groups(ids):
        for s in range(S):
            A, _, _ = _factors(w, i, s)
            if A.shape[0]:
                h[s, toks, : A.shape[0]] = xd[toks] @ A.to(dtype).t()
    return h


def lowp_expand_(
    y: torch.Tensor, h: torch.Tensor, w: LoRAWeights, ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``y += scale * h @ B^T`` computed by PyTorch in ``dtype`` (y is updated in place and returned)."""
    for i, toks in _groups(ids):
        for s in range(w.num_slices):
            _, Bt, sc = _factors(w, i, s)
            r = Bt.shape[0]
            if r:
                c0, n = w.slice_cols[s], w.slice_outs[s]
                d = (h[s, toks, :r].to(dtype) @ Bt.to(dtype)) * sc
                y[toks, c0 : c0 + n] = (y[toks, c0 : c0 + n].to(dtype) + d).to(y.dtype)
    return y


def lowp_add_lora_(
    y: torch.Tensor, x: torch.Tensor, w: LoRAWeights, ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Shrink then expand, both by PyTorch in ``dtype`` (h rounded to ``dtype`` in between)."""
    h = lowp_shrink(x, w, ids, w.max_rank, dtype)
    return lowp_expand_(y, h, w, ids, dtype)


# ---- Triton ahead-of-time compilation for real GPU targets, on a machine without a GPU ------------------------
# (shared by tests/test_triton_compile.py, tests/triton_aot_driver.py and tests/test_deform.py)
def triton_aot_compile(fn, signature: dict, constexprs: dict, arch: int = 90, options: dict | None = None,
                       attrs: dict | None = None):
    """Compile the ``@triton.jit`` function ``fn`` for ``sm_<arch>`` with Triton's own toolchain (no GPU needed)
    and return the compiled kernel (``.asm`` has "ttir", "ptx", "cubin"; ``.metadata.shared`` is its shared
    memory). Parameters missing from ``signature`` are typed "constexpr". ``attrs``: the specialisation
    attributes a launch applies ({(param index,): [["tt.divisibility", 16]]}, as ``JITFunction._pack_args``
    returns them; see tests/triton_aot_driver.py ``launch_specialization``); without them the kernel is compiled
    with no alignment or divisibility assumption, which is NOT the variant a real launch compiles. Only works
    where ``TRITON_INTERPRET`` was unset when ``fn`` was decorated: run it through
    :func:`run_without_interpreter`."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = {p: signature.get(p, "constexpr") for p in inspect.signature(fn.fn).parameters}
    return triton.compile(ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=dict(options or {}))


def run_without_interpreter(argv: Sequence[str], timeout: float = 600):
    """Run ``python argv...`` from the repository root with ``TRITON_INTERPRET`` unset and the repository and
    tests/ on PYTHONPATH (the interpreter swaps ``@triton.jit`` at import, so compiling for a GPU needs a fresh
    process). Returns the ``subprocess.CompletedProcess`` (text output)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=root)


# ---- nvcc: registers / spills / shared memory of CUDA kernels ---------------------------------------------------
# (shared by tests/test_sgmv_decode_emu.py and tests/test_fused_lora_linear_emu.py)
def check_ptxas_budget(tmp_path, source: str, *, expected: int, reg_budget: int) -> list:
    """Compile ``source`` (CUDA C++ that includes a kernel header as ``"kernels/<name>.cuh"`` and instantiates its
    kernels explicitly) with nvcc ``-Xptxas -v`` for sm_80 and sm_90a, print one row per kernel and architecture
    (registers, spill bytes, static shared memory) and assert: ``expected`` rows, no spill stores or loads, at most
    ``reg_budget`` registers per thread. Skips the test without nvcc (/usr/local/bin/nvcc). Returns the rows: dicts
    with name (demangled when c++filt is found), arch, regs, spill, smem."""
    import os
    import re
    import shutil
    import subprocess

    import pytest

    nvcc = "/usr/local/bin/nvcc"
    if not os.path.exists(nvcc):
        pytest.skip("needs nvcc")
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    src = tmp_path / "ptxas_budget.cu"
    src.write_text(source + "\n")
    cmd = [nvcc, "-std=c++17", "-O3", "-c", "-I", csrc, "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90a,code=sm_90a", "-Xptxas", "-v", str(src), "-o", str(tmp_path / "inst.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows, cur = [], None
    for line in (r.stdout + r.stderr).splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\w+)'", line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2)}
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur is not None:
            cur["spill"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
        if m and cur is not None:
            cur["regs"], cur["smem"] = int(m.group(1)), int(m.group(2))
            rows.append(cur)
            cur = None
    assert len(rows) == expected, f"expected {expected} kernels, parsed {len(rows)}"
    filt = shutil.which("c++filt")
    if filt:
        names = subprocess.run([filt], input="\n".join(row["name"] for row in rows), capture_output=True,
                               text=True).stdout.splitlines()
        for row, nm in zip(rows, names):
            row["name"] = re.sub(r"\(lora_kernels::\w+\)$", "", nm).replace("lora_kernels::", "")
    width = max(len(row["name"]) for row in rows)
    print(f"\n{'kernel':<{width}} {'arch':>5} {'regs':>5} {'spill':>6} {'smem':>6}")
    for row in rows:
        print(f"{row['name']:<{width}} {row['arch']:>5} {row['regs']:>5} {row.get('spill', -1):>6} {row['smem']:>6}")
    for row in rows:
        assert row.get("spill") == 0, f"{row['name']} sm_{row['arch']}: spills"
        assert row["regs"] <= reg_budget, f"{row['name']} sm_{row['arch']}: {row['regs']} registers > {reg_budget}"
    return rows


# (shared by tests/test_mixed.py and tests/test_triton_sgmv.py)
def weights_on(w: LoRAWeights, device) -> LoRAWeights:
    """The same weights with every tensor on ``device`` (shares nothing with w when it moves; ``w`` itself when
    it is already there)."""
    if torch.device(device) == w.device:
        return w
    c = LoRAWeights.__new__(LoRAWeights)
    c.__dict__.update(w.__dict__)
    for k in ("a", "b", "offsets", "ranks", "scales", "slice_info"):
        setattr(c, k, getattr(w, k).to(device))
    return c


# ---- the compiled extension (shared by tests/test_extension.py and tests/test_cuda.py) ----------------------
def extension_unbuildable_reason() -> str | None:
    """None if this environment can compile ``lora_kernels._C`` (torch with CUDA, nvcc found), else why not."""
    from lora_kernels import _ext

    if not torch.version.cuda:
        return "torch is a CPU-only build"
    if _ext.cuda_home() is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def require_aot_extension() -> None:
    """Skip when the AOT extension is legitimately absent (installed without it, or unbuildable here); fail when
    it should have been built (torch with CUDA and nvcc present) but is missing."""
    import importlib.util
    import os

    import pytest

    if importlib.util.find_spec("lora_kernels._C") is not None:
        return
    if os.environ.get("LORA_KERNELS_NO_EXTENSION", "0") not in ("", "0"):
        pytest.skip("installed without the extension (LORA_KERNELS_NO_EXTENSION is set)")
    why = extension_unbuildable_reason()
    if why:
        pytest.skip(f"lora_kernels._C not built: {why}")
    pytest.fail(
        "lora_kernels._C is missing although torch has CUDA and nvcc exists: reinstall with "
        "`pip install --no-build-isolation -e .` and read setup.py's output"
    )


def require_compiled_extension():
    """:func:`require_aot_extension`, then the loaded extension's op namespace (``torch.ops.lora_kernels_C``);
    fails when the built extension does not load."""
    import pytest

    from lora_kernels import _ext

    require_aot_extension()
    ns = _ext.get(build=False)
    if ns is None:
        pytest.fail(f"lora_kernels._C is built but does not load: {_ext.status()}")
    return ns


def assert_compiled_cuda_op(op, qualname: str) -> None:
    """``op`` is the extension's C++ operator ``qualname`` (``torch.ops.lora_kernels_C.<name>``) whose CUDA
    kernel was registered by csrc/bindings.cpp: not a Python function, not the torch fallback of the same op."""
    assert isinstance(op, torch._ops.OpOverloadPacket), f"{qualname}: expected the compiled op, got {op!r}"
    assert op._qualified_op_name == qualname, f"expected {qualname}, got {op._qualified_op_name}"
    dump = torch._C._dispatch_dump(qualname)
    cuda = next((ln for ln in dump.splitlines() if ln.startswith("CUDA:")), "")
    assert "bindings.cpp" in cuda, f"{qualname}: its CUDA kernel is not the extension's (csrc/bindings.cpp):\n{dump}"


# ---- CUDA kernel emulators (tests/*_emu.cpp) ------------------------------------------------------------------------
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a fp16/bf16/fp32 tensor as integers (bitwise comparisons)."""
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def whole_storage(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under a view, as a flat tensor of its dtype."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())


def build_emulator(tmp_path_factory, cpp: str) -> str:
    """Compile tests/<cpp> (a CUDA kernel under the CPU emulator) with the host compiler; the executable's path.
    Skips without g++ (or clang++) or the CUDA headers."""
    import shutil
    import subprocess

    import pytest

    inc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None or not os.path.exists(os.path.join(inc, "cuda_fp16.h")):
        pytest.skip("needs g++ and the CUDA headers")
    exe = str(tmp_path_factory.mktemp(cpp.split(".")[0]) / cpp.split(".")[0])
    cmd = [cxx, "-std=c++20", "-O1", "-w", "-I", os.path.join(_REPO, "csrc"), "-I", inc,
           os.path.join(_REPO, "tests", cpp), "-o", exe]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


def import_engine_modules(*names: str) -> list:
    """Import the engine modules ``names`` in order, as the engine conformance tests need them on a CPU machine.

    vLLM (and SGLang, which imports parts of it) decides at import whether its Triton kernels are real: without a
    GPU driver it stubs them unless ``CUDA_VISIBLE_DEVICES`` is set and empty, as vLLM's own code allows. When torch
    sees no GPU the variable is set empty for the imports only (then restored); otherwise they import as usual."""
    import importlib

    if torch.cuda.is_available():
        return [importlib.import_module(n) for n in names]
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
