"""lora_kernels.fusion: task arithmetic and TIES against direct dense implementations (fp64, several chunk sizes,
ties on magnitudes), low-rank outputs, linearize() served by add_lora_, V-LoRA task grouping, bad inputs."""

from __future__ import annotations

import functools

import pytest
import torch

import lora_kernels as lk
from lora_kernels.federated.adapters import LoRAFactors
from lora_kernels.fusion import group_tasks, kth_largest_magnitude, linearize, task_arithmetic, ties, ties_keep_count

F64 = torch.float64


def make_adapters(ranks, out=13, inf=11, dtype=F64, seed=0, integer=False, scales=None):
    g = torch.Generator().manual_seed(seed)
    res = []
    for i, r in enumerate(ranks):
        if integer:  # small integers: every product is exact, so magnitudes tie exactly and often
            A = torch.randint(-2, 3, (r, inf), generator=g).to(dtype)
            B = torch.randint(-2, 3, (out, r), generator=g).to(dtype)
        else:
            A = torch.randn(r, inf, generator=g, dtype=F64).to(dtype)
            B = torch.randn(out, r, generator=g, dtype=F64).to(dtype)
        res.append((A, B, scales[i] if scales else 0.5 + 0.25 * i))
    return res


def taus_dense(adapters, lams):
    return torch.stack([lam * s * (B.double() @ A.double()) for (A, B, s), lam in zip(adapters, lams)])


def ties_dense(adapters, density, lams):
    """TIES done the direct way: whole task vectors, torch.kthvalue thresholds."""
    tau = taus_dense(adapters, lams)
    n, numel = tau.shape[0], tau[0].numel()
    k = max(1, round(density * numel))
    thr = torch.stack([tau[i].abs().flatten().kthvalue(numel - k + 1).values for i in range(n)])
    tau = tau * (tau.abs() >= thr.view(n, 1, 1))
    g = torch.sign(tau.sum(0))
    agree = (torch.sign(tau) == g) & (g != 0)
    return (tau * agree).sum(0) / agree.sum(0).clamp(min=1)


def best_rank_k(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


# ---- the exact selection ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("seed", range(4))
def test_kth_largest_magnitude_matches_sort(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = 3
    M = torch.randn(n, 13, 7, generator=g, dtype=F64).to(dtype)
    if seed % 2:  # many exact ties and zeros, including -0.0
        M = torch.randint(-3, 4, (n, 13, 7), generator=g).to(dtype)
        M[0, 0, 0] = -0.0
    k = torch.randint(1, 13 * 7 + 1, (n,), generator=g)
    k[0] = 13 * 7  # the smallest magnitude
    cuts = [0, 5, 6, 10, 13]

    def chunks():
        for a, b in zip(cuts[:-1], cuts[1:]):
            yield M[:, a:b]

    out = kth_largest_magnitude(chunks, k, dtype)
    ref = torch.stack([M[i].abs().flatten().sort(descending=True).values[k[i] - 1] for i in range(n)])
    assert out.dtype == dtype and torch.equal(out, ref)


# ---- task arithmetic -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [1, 3, 5, 13, 64, None])
def test_task_arithmetic_dense_matches_direct(chunk_rows):
    ads = make_adapters([1, 3, 5, 2])
    lams = [0.7, -0.3, 1.2, 0.5]
    out = task_arithmetic(ads, lams, chunk_rows=chunk_rows)
    assert out.dtype == F64 and out.shape == (13, 11)
    torch.testing.assert_close(out, taus_dense(ads, lams).sum(0), rtol=1e-12, atol=1e-12)


def test_task_arithmetic_lowrank():
    ads = make_adapters([2, 3, 4], out=17, inf=19)
    lams = [0.5, 1.0, -0.75]
    dense = taus_dense(ads, lams).sum(0)
    ex = task_arithmetic(ads, lams, rank="exact")
    assert isinstance(ex, LoRAFactors) and ex.rank == 9 and ex.scale == 1.0
    torch.testing.assert_close(ex.delta(), dense, rtol=1e-12, atol=1e-12)
    for k in (1, 4, 8):
        f = task_arithmetic(ads, lams, rank=k)
        assert f.rank == k and f.A.shape == (k, 19) and f.B.shape == (17, k)
        torch.testing.assert_close(f.delta(), best_rank_k(dense, k), rtol=1e-9, atol=1e-9)
    big = task_arithmetic(ads, lams, rank=50)  # above the stacked rank: the exact stack
    assert big.rank == 9
    torch.testing.assert_close(big.delta(), dense, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_fp16_factors_compute_in_fp32():
    ads = make_adapters([2, 4], dtype=torch.float16, integer=True)
    out = task_arithmetic(ads, [1.0, 0.5])
    assert out.dtype == torch.float32
    assert torch.equal(out.double(), taus_dense(ads, [1.0, 0.5]).sum(0))  # integer products: exact


# ---- TIES ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.05, 0.35, 1.0])
@pytest.mark.parametrize("chunk_rows", [1, 4, 13, None])
def test_ties_matches_direct_dense(density, chunk_rows):
    ads = make_adapters([1, 3, 5, 2], seed=1)
    lams = [1.0, 0.5, -1.5, 2.0]
    out = ties(ads, density, lams, chunk_rows=chunk_rows)
    assert out.dtype == F64 and out.shape == (13, 11)
    torch.testing.assert_close(out, ties_dense(ads, density, lams), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.8])
def test_ties_ties_on_magnitudes_exact(density):
    ads = make_adapters([1, 2, 3, 2, 1], out=10, inf=9, integer=True, scales=[1.0, 0.5, 2.0, 1.0, 0.25], seed=3)
    ref = ties_dense(ads, density, [0.5] * 5)
    results = [ties(ads, density, 0.5, chunk_rows=c) for c in (1, 3, 7, 10, None)]
    for r in results:
        assert torch.equal(r, ref)  # exact products: bit-identical, whatever the chunking
    # Ties at the threshold are all kept: more than k entries survive for some task here.
    tau = taus_dense(ads, [0.5] * 5)
    k = ties_keep_count(density, 90)
    kept = [(tau[i].abs() >= tau[i].abs().flatten().kthvalue(90 - k + 1).values).sum().item() for i in range(5)]
    assert all(c >= k for c in kept) and any(c > k for c in kept)


def test_ties_scalar_lambda_scales_standard_ties():
    ads = make_adapters([2, 2, 3], seed=4)
    base = ties(ads, 0.3)
    torch.testing.assert_close(ties(ads, 0.3, 0.4), 0.4 * base, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ties(ads, 0.3, -2.0), -2.0 * base, rtol=1e-12, atol=1e-12)


def test_ties_single_task_full_density_is_the_task_vector():
    ads = make_adapters([3], seed=5)
    torch.testing.assert_close(ties(ads, 1.0, 0.5), taus_dense(ads, [0.5])[0], rtol=1e-12, atol=1e-12)


def test_ties_fp16_factors_and_lowrank():
    ads = make_adapters([2, 3, 1], dtype=torch.float16, integer=True, scales=[1.0, 0.5, 2.0], seed=6)
    out = ties(ads, 0.4, chunk_rows=4)
    assert out.dtype == torch.float32  # exact products; only the mean's division rounds (in fp32)
    torch.testing.assert_close(out.double(), ties_dense(ads, 0.4, [1.0] * 3), rtol=1e-7, atol=0)
    ads64 = make_adapters([2, 3, 1], seed=7)
    dense = ties_dense(ads64, 0.4, [1.0] * 3)
    for k in (1, 3, 11, 20):
        f = ties(ads64, 0.4, rank=k, chunk_rows=5)
        assert isinstance(f, LoRAFactors) and f.rank == min(k, 11) and f.scale == 1.0
        torch.testing.assert_close(f.delta(), best_rank_k(dense, min(k, 11)), rtol=1e-9, atol=1e-9)


# ---- many layers, LoRAWeights slots ---------------------------------------------------------------------------
def test_many_layers_and_weights_slots():
    q = make_adapters([2, 4, 3], out=12, inf=8, seed=8)
    v = make_adapters([1, 2, 2], out=6, inf=8, seed=9)
    tasks = [{"q": q[i], "v": v[i]} for i in range(3)]
    lams = [0.5, 1.0, 0.25]
    ta = task_arithmetic(tasks, lams, chunk_rows=5)
    tt = ties(tasks, 0.3, lams, chunk_rows=5)
    assert set(ta) == set(tt) == {"q", "v"}
    for name, ads in (("q", q), ("v", v)):
        torch.testing.assert_close(ta[name], taus_dense(ads, lams).sum(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tt[name], ties_dense(ads, 0.3, lams), rtol=1e-12, atol=1e-12)
    lr = task_arithmetic(tasks, lams, rank=2)
    assert lr["q"].rank == 2 and lr["v"].rank == 2

    # The same adapters in rank-paged storage (fp32): slots give what the tuples give.
    w = lk.LoRAWeights(8, 12, max_adapters=4, max_rank=4, dtype=torch.float32)
    ids = [w.add(A.float(), B.float(), scale=s) for A, B, s in q]
    slots = [(w, i) for i in ids]
    as_tuples = [w.adapter(i) for i in ids]
    torch.testing.assert_close(ties(slots, 0.3, lams), ties(as_tuples, 0.3, lams), rtol=0, atol=0)
    torch.testing.assert_close(task_arithmetic(slots, lams), taus_dense(q, lams).sum(0).float(), rtol=1e-5,
                               atol=1e-5)


# ---- linearize -------------------------------------------------------------------------------------------------
def test_linearize_served_by_add_lora_equals_explicit_linearisation():
    g = torch.Generator().manual_seed(10)
    inf, out, r, T = 16, 12, 3, 9
    A0, B0 = torch.randn(r, inf, generator=g) / 4, torch.randn(out, r, generator=g) / 4
    A, B = A0 + torch.randn(r, inf, generator=g) / 8, B0 + torch.randn(out, r, generator=g) / 8
    W0 = torch.randn(out, inf, generator=g) / 4
    x = torch.randn(T, inf, generator=g)
    alpha = 6.0
    s = alpha / r  # the original adapter's scale: the rank-2r adapter must keep it
    lin = linearize(A0, B0, A, B, scale=s)
    assert lin.A.shape == (2 * r, inf) and lin.B.shape == (out, 2 * r) and lin.scale == s
    w = lk.LoRAWeights(inf, out, max_adapters=3, max_rank=2 * r, dtype=torch.float32)
    other = w.add(torch.randn(2, inf, generator=g), torch.randn(out, 2, generator=g), alpha=2.0)
    lid = w.add(lin.A, lin.B, scale=lin.scale)
    ids = torch.tensor([lid, -1, other, lid, lid, -1, other, lid, lid], dtype=torch.int32)
    batch = lk.LoRABatch(max_tokens=16, max_adapters=3, device="cpu")
    batch.build(ids, ranks=w.ranks)
    y = x @ W0.t()
    with torch.no_grad():
        lk.add_lora_(y, x, w, batch)
    d = lambda t: t.double()  # noqa: E731
    explicit = d(x) @ (d(W0) + s * (d(B0) @ d(A0) + (d(B) - d(B0)) @ d(A0) + d(B0) @ (d(A) - d(A0)))).t()
    sel = ids == lid
    torch.testing.assert_close(y[sel].double(), explicit[sel], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[ids == -1].double(), (d(x) @ d(W0).t())[ids == -1], rtol=1e-5, atol=1e-5)
    # Loading it with alpha= instead would divide by the new rank 2r: visibly wrong, hence the scale field.
    assert abs(alpha / (2 * r) - s) > 0.1


def test_linearize_identity_fp64_and_peft_init():
    g = torch.Generator().manual_seed(11)
    A0, A = torch.randn(4, 7, generator=g, dtype=F64), torch.randn(4, 7, generator=g, dtype=F64)
    B0, B = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, 4, generator=g, dtype=F64)
    lin = linearize(A0, B0, A, B, scale=0.5)
    torch.testing.assert_close(lin.delta(), 0.5 * (B0 @ A0 + (B - B0) @ A0 + B0 @ (A - A0)), rtol=1e-12,
                               atol=1e-12)
    zero = linearize(A0, torch.zeros_like(B0), A, B)  # PEFT's B0 = 0: the delta is B A0
    torch.testing.assert_close(zero.delta(), B @ A0, rtol=1e-12, atol=1e-12)
    # The linearised adapters fuse like any adapter.
    ta = task_arithmetic([lin, zero], [1.0, 1.0])
    torch.testing.assert_close(ta, lin.delta() + zero.delta(), rtol=1e-12, atol=1e-12)


def test_linearize_bad_inputs():
    A0, B0 = torch.zeros(3, 8), torch.zeros(5, 3)
    with pytest.raises(ValueError, match="^A:"):
        linearize(A0, B0, torch.zeros(4, 8), B0)
    with pytest.raises(ValueError, match="^B:"):
        linearize(A0, B0, A0, torch.zeros(5, 4))
    with pytest.raises(ValueError, match="^B0:"):
        linearize(A0, torch.zeros(5, 2), A0, B0)
    with pytest.raises(TypeError, match="^A0:"):
        linearize(A0.long(), B0, A0, B0)
    with pytest.raises(ValueError, match="^scale:"):
        linearize(A0, B0, A0, B0, scale=float("nan"))


# ---- V-LoRA grouping -------------------------------------------------------------------------------------------
def _direction_tasks(dirs, out=6, inf=4):
    """Task t maps input direction e_{dirs[t]} to its own output direction: tasks sharing an input direction
    interfere when fused, tasks on different directions do not. The right grouping is known."""
    ads = []
    for t, d in enumerate(dirs):
        A = torch.zeros(1, inf, dtype=F64)
        A[0, d] = 1.0
        B = torch.zeros(out, 1, dtype=F64)
        B[t % out, 0] = 1.0
        ads.append((A, B, 1.0))
    return ads


def _cos_evaluate(ads):
    def evaluate(fused, tasks):
        W = fused.delta()
        accs = []
        for t in tasks:
            A, B, _ = ads[t]
            y, want = W @ A[0], B[:, 0]
            accs.append(float(y @ want / (y.norm() * want.norm() + 1e-30)))
        return accs

    return evaluate


def test_group_tasks_finds_the_known_grouping():
    ads = _direction_tasks([0, 0, 1, 1, 2])
    res = group_tasks(ads, _cos_evaluate(ads), 0.9)
    assert res.groups == [[0, 2, 4], [1, 3]]
    assert res.below_floor == []
    assert all(a >= 0.9 for a in res.accuracies) and res.single_accuracies == pytest.approx([1.0] * 5)
    assert res.group_of(3) == 1 and len(res.adapters) == 2
    # each group's adapter is the exact task-arithmetic fusion of its members
    torch.testing.assert_close(res.adapters[0].delta(), sum(ads[t][1] @ ads[t][0] for t in (0, 2, 4)))
    # conflicting tasks fused would give cos = 1/sqrt(2) < 0.9: the floors decide; a low floor fuses them all
    assert group_tasks(ads, _cos_evaluate(ads), 0.7).groups == [[0, 1, 2, 3, 4]]
    # a permutation changes the greedy order, not the validity
    res2 = group_tasks(ads, _cos_evaluate(ads), 0.9, order=[4, 3, 2, 1, 0])
    assert res2.groups == [[4, 3, 1], [2, 0]]


def test_group_tasks_below_floor_and_train_variant():
    ads = _direction_tasks([0, 1, 2])

    def evaluate(fused, tasks):
        base = _cos_evaluate(ads)(fused, tasks)
        return {t: (0.1 if t == 2 else v) for t, v in zip(tasks, base)}  # task 2 can never reach its floor

    res = group_tasks(ads, evaluate, [0.9, 0.9, 0.5])
    assert res.groups == [[0, 1], [2]] and res.below_floor == [2]

    # Train variant: the "data" of a task is its direction pair; training makes the exact adapter of the union.
    data = [(0, 0), (0, 1), (1, 2)]
    trained = []

    def train(items):
        trained.append(len(items))
        A = torch.zeros(len(items), 4, dtype=F64)
        B = torch.zeros(6, len(items), dtype=F64)
        for j, (d, o) in enumerate(items):
            A[j, d], B[o, j] = 1.0, 1.0
        return LoRAFactors(A, B, 1.0)

    res = group_tasks(data, _cos_evaluate(_direction_tasks([0, 0, 1])), 0.9, train=train)
    assert res.groups == [[0, 2], [1]] and trained[:3] == [1, 1, 1]


def test_group_tasks_with_ties_fuse():
    ads = _direction_tasks([0, 1, 2, 3])
    fuse = functools.partial(ties, density=1.0, rank=4)
    res = group_tasks(ads, _cos_evaluate(ads), 0.9, fuse=lambda items: fuse(items))
    assert res.groups == [[0, 1, 2, 3]]


def test_group_tasks_bad_inputs():
    ads = _direction_tasks([0, 1])
    ev = _cos_evaluate(ads)
    with pytest.raises(ValueError, match="^adapters:"):
        group_tasks([], ev, 0.5)
    with pytest.raises(ValueError, match="^floors:"):
        group_tasks(ads, ev, [0.5])
    with pytest.raises(ValueError, match="^floors:"):
        group_tasks(ads, ev, [0.5, float("nan")])
    with pytest.raises(ValueError, match="^fuse:"):
        group_tasks(ads, ev, 0.5, fuse=lambda x: x, train=lambda x: x)
    with pytest.raises(ValueError, match="^order:"):
        group_tasks(ads, ev, 0.5, order=[0, 0])
    with pytest.raises(ValueError, match="^evaluate:"):
        group_tasks(ads, lambda f, t: [1.0, 1.0, 1.0], 0.5)
    with pytest.raises(ValueError, match="^evaluate:"):
        group_tasks(ads, lambda f, t: [float("nan")] * len(t), 0.5)


# ---- bad inputs ------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_before_anything_and_leave_inputs_unchanged():
    ads = make_adapters([2, 3, 1], seed=12)
    before = [(A.clone(), B.clone()) for A, B, _ in ads]
    with pytest.raises(ValueError, match="^adapters:"):
        task_arithmetic([], 1.0)
    with pytest.raises(ValueError, match="^adapters:"):
        ties([], 0.5)
    with pytest.raises(TypeError, match="^adapters:"):
        ties(torch.zeros(3), 0.5)
    bad_in = ads[:2] + [(torch.zeros(1, 12, dtype=F64), torch.zeros(13, 1, dtype=F64), 1.0)]
    bad_out = ads[:2] + [(torch.zeros(1, 11, dtype=F64), torch.zeros(14, 1, dtype=F64), 1.0)]
    for fn in (lambda a: task_arithmetic(a, 1.0), lambda a: ties(a, 0.5)):
        with pytest.raises(ValueError, match=r"^adapters\[2\]"):
            fn(bad_in)
        with pytest.raises(ValueError, match=r"^adapters\[2\]"):
            fn(bad_out)
    with pytest.raises(ValueError, match=r"^adapters\[1\]"):  # A [r, in] with B [out, r'] of another rank
        ties([ads[0], (torch.zeros(2, 11, dtype=F64), torch.zeros(13, 3, dtype=F64), 1.0)], 0.5)
    for d in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="^density:"):
            ties(ads, d)
    with pytest.raises(TypeError, match="^density:"):
        ties(ads, "0.5")
    nan = [ads[0], (ads[1][0].clone(), ads[1][1].clone(), ads[1][2]), ads[2]]
    nan[1][1][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^adapters\[1\]\.B:"):
        ties(nan, 0.5)
    with pytest.raises(ValueError, match=r"^adapters\[1\]\.B:"):
        task_arithmetic(nan, 1.0)
    with pytest.raises(ValueError, match="^lambdas:"):
        task_arithmetic(ads, [1.0, 2.0])
    with pytest.raises(ValueError, match="^lambdas:"):
        ties(ads, 0.5, [1.0, float("inf"), 1.0])
    with pytest.raises(ValueError, match="^rank:"):
        task_arithmetic(ads, 1.0, rank=0)
    with pytest.raises(ValueError, match="^rank:"):
        ties(ads, 0.5, rank="exact")
    with pytest.raises(ValueError, match="^chunk_rows:"):
        ties(ads, 0.5, chunk_rows=0)
    tasks = [{"q": ads[0]}, {"k": ads[1]}]
    with pytest.raises(ValueError, match=r"^adapters\[1\]"):
        task_arithmetic(tasks, 1.0)
    with pytest.raises(TypeError, match=r"^adapters\[1\]"):
        task_arithmetic([{"q": ads[0]}, ads[1]], 1.0)
    for (A, B, _), (A0, B0) in zip(ads, before):
        assert torch.equal(A, A0) and torch.equal(B, B0)


# ---- on a GPU --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_fusion_on_cuda_matches_dense_and_serves():
    """On the GPU (bincount/searchsorted histograms, batched matmuls): bit-exact TIES and task arithmetic for
    small-integer factors (exact in fp32), and a linearised adapter served by the Triton add_lora_."""
    ads = make_adapters([16, 4, 8, 1, 12, 16], out=300, inf=200, dtype=torch.float32, integer=True,
                        scales=[1.0, 0.5, 2.0, 1.0, 0.25, 1.0], seed=13)
    cuda = [(A.cuda(), B.cuda(), s) for A, B, s in ads]
    lams = [1.0, 0.5, -1.0, 2.0, 1.0, 0.5]
    for density in (0.05, 0.3):
        for c in (7, 64, None):
            out = ties(cuda, density, lams, chunk_rows=c)
            assert out.is_cuda and out.dtype == torch.float32
            torch.testing.assert_close(out.cpu().double(), ties_dense(ads, density, lams), rtol=1e-7, atol=0)
    ta = task_arithmetic(cuda, lams, chunk_rows=33)
    torch.testing.assert_close(ta.cpu().double(), taus_dense(ads, lams).sum(0), rtol=0, atol=0)
    lr = task_arithmetic(cuda, lams, rank=8)
    torch.testing.assert_close(lr.delta().cpu().double(), best_rank_k(taus_dense(ads, lams).sum(0), 8),
                               rtol=1e-3, atol=1e-3)

    g = torch.Generator().manual_seed(14)
    inf, outf, r, T = 64, 48, 4, 40
    A0, B0 = torch.randn(r, inf, generator=g) / 8, torch.randn(outf, r, generator=g) / 8
    A, B = A0 + torch.randn(r, inf, generator=g) / 16, B0 + torch.randn(outf, r, generator=g) / 16
    x = torch.randn(T, inf, generator=g)
    lin = linearize(A0.cuda(), B0.cuda(), A.cuda(), B.cuda(), scale=0.75)
    w = lk.LoRAWeights(inf, outf, max_adapters=2, max_rank=2 * r, dtype=torch.float32, device="cuda")
    lid = w.add(lin.A, lin.B, scale=lin.scale)
    ids = torch.tensor([lid, -1] * (T // 2), dtype=torch.int32)
    batch = lk.LoRABatch(max_tokens=T, max_adapters=2, device="cuda")
    batch.build(ids.cuda(), ranks=w.ranks)
    y = torch.zeros(T, outf, device="cuda")
    with torch.no_grad():
        lk.add_lora_(y, x.cuda(), w, batch)
    d = lambda t: t.double()  # noqa: E731
    explicit = 0.75 * d(x) @ (d(B0) @ d(A0) + (d(B) - d(B0)) @ d(A0) + d(B0) @ (d(A) - d(A0))).t()
    explicit[ids == -1] = 0
    torch.testing.assert_close(y.cpu().double(), explicit, rtol=1e-4, atol=1e-5)
