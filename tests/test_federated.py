"""lora_kernels.federated: exact stacking, stack + truncated SVD, the FedAvg baseline's reported error,
redistribution, server optimisers vs per-tensor loops, FedProx, and refusals that leave inputs untouched."""

import math

import pytest
import torch

import lora_kernels as lk
import lora_kernels.federated as fed
from lora_kernels.federated import lowrank

F64 = torch.float64
SHAPES = {"q": (12, 10), "k": (12, 10), "o": (7, 9)}  # name -> (in, out); q and k form one batched group


def make_clients(ranks, dtype=F64, seed=0, shapes=SHAPES, scales=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, r in enumerate(ranks):
        c = {}
        for n, (i, o) in shapes.items():
            s = (scales[k] if scales is not None else 2.0 / r)
            c[n] = (torch.randn(r, i, generator=g, dtype=F64).to(dtype), torch.randn(o, r, generator=g,
                                                                                         dtype=F64).to(dtype), s)
        out.append(c)
    return out


def dense_sum(clients, weights):
    tot = sum(weights)
    return {n: sum((w / tot) * c[n][2] * (c[n][1].double() @ c[n][0].double()) for c, w in zip(clients, weights))
            for n in clients[0]}


def best_rank(D, k):
    U, S, Vh = torch.linalg.svd(D)
    return (U[:, :k] * S[:k]) @ Vh[:k], S


def snapshot(clients):
    return [{n: (v[0].clone(), v[1].clone()) for n, v in c.items()} for c in clients]


def unchanged(clients, snap):
    return all(torch.equal(c[n][0], s[n][0]) and torch.equal(c[n][1], s[n][1]) for c, s in zip(clients, snap)
               for n in c)


# ---- stack ----------------------------------------------------------------------------------------------------
def test_stack_is_exact_fp64_mixed_ranks():
    ranks, w = [5, 3, 1, 8], [1.0, 2.0, 0.5, 3.0]
    clients = make_clients(ranks)
    D = dense_sum(clients, w)
    agg = fed.stack(clients, w)
    assert agg.method == "stack" and list(agg) == list(SHAPES)
    for n in SHAPES:
        f = agg[n]
        assert f.A.dtype == F64 and f.rank == sum(ranks) and f.scale == 1.0
        err = (f.B @ f.A - D[n]).abs().max().item()
        assert err <= 1e-12 * D[n].abs().max().item(), (n, err)
        # B is the clients' own columns, untouched; the weights sit on A.
        assert torch.equal(f.B[:, :ranks[0]], clients[0][n][1])


def test_stack_weights_default_uniform_and_normalised():
    clients = make_clients([2, 4])
    a, b = fed.stack(clients), fed.stack(clients, [7.0, 7.0])
    for n in SHAPES:
        assert torch.allclose(a[n].B @ a[n].A, b[n].B @ b[n].A, rtol=0, atol=1e-13)


def test_stack_accepts_loraweights_slots_and_from_weights():
    g = torch.Generator().manual_seed(3)
    w = lk.LoRAWeights(12, [10, 6], max_adapters=3, max_rank=8, dtype=torch.float32)
    ids = []
    for r in (3, 8):
        ids.append(w.add([torch.randn(r, 12, generator=g) for _ in range(2)],
                         [torch.randn(10, r, generator=g), torch.randn(6, r, generator=g)], alpha=4.0))
    via_slots = [{"qk": (w, i, 0), "v": (w, i, 1)} for i in ids]
    via_tuples = [{"qk": w.adapter(i, 0), "v": w.adapter(i, 1)} for i in ids]
    a, b = fed.stack(via_slots, [1, 3]), fed.stack(via_tuples, [1, 3])
    c = fed.stack([fed.from_weights({"x": w}, i) for i in ids], [1, 3])
    assert set(c) == {"x[0]", "x[1]"}
    for n, m in (("qk", "x[0]"), ("v", "x[1]")):
        assert torch.equal(a[n].A, b[n].A) and torch.equal(a[n].B, c[m].B)
        assert a[n].A.dtype == torch.float32  # fp32 maths for fp32 storage
    with pytest.raises(ValueError, match="slice_index"):
        fed.stack([{"qk": (w, ids[0])}])


def test_half_precision_inputs_use_fp32_maths():
    clients = make_clients([2, 3], dtype=torch.float16)
    agg = fed.stack_svd(clients, 4)
    assert agg["q"].A.dtype == torch.float32
    assert fed.stack(clients, compute_dtype=F64)["q"].A.dtype == F64


def test_ranks_may_differ_per_layer_and_aggregates_chain():
    clients = make_clients([4, 2, 3])
    g = torch.Generator().manual_seed(11)
    clients[1]["o"] = (torch.randn(6, 7, generator=g, dtype=F64), torch.randn(9, 6, generator=g, dtype=F64), 0.25)
    D = dense_sum(clients, [1, 1, 1])
    st = fed.stack(clients)
    assert st["o"].rank == 13 and st["q"].rank == 9
    again = fed.stack([st, st], [1, 3])  # an Aggregate is a client adapter
    sv = fed.stack_svd(clients, 5)
    for n in SHAPES:
        assert torch.allclose(st[n].B @ st[n].A, D[n], atol=1e-12)
        assert torch.allclose(again[n].B @ again[n].A, D[n], atol=1e-12)
        assert torch.allclose(sv[n].B @ sv[n].A, best_rank(D[n], 5)[0], atol=1e-11)


# ---- stack_svd --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["auto", "qr", "dense"])
def test_stack_svd_is_best_rank_k(method):
    ranks, w, k = [3, 2, 1], [2.0, 1.0, 1.0], 4
    clients = make_clients(ranks)
    D = dense_sum(clients, w)
    agg = fed.stack_svd(clients, k, w, method=method)
    for n in SHAPES:
        best, S = best_rank(D[n], k)
        f = agg[n]
        assert f.rank == k
        assert (f.B @ f.A - best).abs().max().item() <= 1e-12 * S[0].item()
        assert torch.allclose(torch.linalg.svdvals(f.B @ f.A)[:k], S[:k], rtol=1e-12, atol=0)
        want = math.sqrt(S[k:].square().sum().item() / S.square().sum().item())
        assert agg.rel_error[n] == pytest.approx(want, rel=1e-9)
        # balanced split: A and B carry the same singular values
        assert torch.allclose(torch.linalg.svdvals(f.A), torch.linalg.svdvals(f.B), rtol=1e-10)
    assert any("dense SVD" in s for s in agg.notes) == (method == "dense")


def test_stack_svd_full_rank_is_exact_and_fallback_is_reported():
    # stacked rank 11 > min(in, out): the dense SVD is cheaper for those layers, and the notes say so.
    clients = make_clients([6, 5], shapes={"a": (8, 9), "b": (40, 30)})
    D = dense_sum(clients, [1, 1])
    agg = fed.stack_svd(clients, 8)
    assert agg.rel_error["a"] <= 1e-7  # rank 8 reaches the rank of the 9 x 8 layer "a"
    assert torch.allclose(agg["a"].B @ agg["a"].A, D["a"], atol=1e-12)
    notes = " ".join(agg.notes)
    assert "dense SVD" in notes and "'a'" in notes and "'b'" not in notes
    assert lowrank.svd_method(11, 8, 9)[0] == "dense" and lowrank.svd_method(11, 40, 30)[0] == "qr"


def test_stack_svd_qr_route_never_forms_the_dense_matrix(monkeypatch):
    clients = make_clients([2, 3, 1], shapes={"w": (40, 33)})
    R = 6
    seen = []
    real_svd = torch.linalg.svd

    def spy(x, *a, **kw):
        seen.append(tuple(x.shape[-2:]))
        return real_svd(x, *a, **kw)

    real_mm = torch.Tensor.__matmul__

    def mm_spy(a, b):
        out = real_mm(a, b)
        assert tuple(out.shape[-2:]) != (33, 40), "formed the dense out x in product"
        return out

    monkeypatch.setattr(torch.linalg, "svd", spy)
    monkeypatch.setattr(torch.Tensor, "__matmul__", mm_spy)
    agg = fed.stack_svd(clients, 3)
    monkeypatch.undo()
    assert seen and all(max(s) <= R for s in seen), seen
    best, _ = best_rank(dense_sum(clients, [1, 1, 1])["w"], 3)
    assert torch.allclose(agg["w"].B @ agg["w"].A, best, atol=1e-11)


def test_lowrank_batched_matches_per_layer():
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(4, 6, 20, generator=g, dtype=F64), torch.randn(4, 15, 6, generator=g, dtype=F64)
    U, S, Vh, used = lowrank.lowrank_svd(A, B, "qr")
    assert used == "qr" and U.shape == (4, 15, 6) and Vh.shape == (4, 6, 20)
    for i in range(4):
        assert torch.allclose(S[i], torch.linalg.svdvals(B[i] @ A[i])[:6], rtol=1e-12)
        assert torch.allclose((U[i] * S[i]) @ Vh[i], B[i] @ A[i], atol=1e-12)
    assert torch.allclose(lowrank.lowrank_norm(A, B), torch.linalg.matrix_norm(B @ A), rtol=1e-12)
    # the QR norm stays accurate for a tiny difference (a Gram trace would not)
    eps = 1e-9
    d = lowrank.lowrank_diff_norm(A, B, A, B * (1 + eps))
    assert torch.allclose(d, eps * torch.linalg.matrix_norm(B @ A), rtol=1e-5)


# ---- fedavg ---------------------------------------------------------------------------------------------------
def test_fedavg_error_is_reported_and_correct():
    ranks, w = [4, 2, 1], [1.0, 1.0, 2.0]
    clients = make_clients(ranks)
    D = dense_sum(clients, w)
    agg = fed.fedavg(clients, w)
    tot = sum(w)
    for n in SHAPES:
        r = max(ranks)
        A = sum((wk / tot) * torch.nn.functional.pad(c[n][0], (0, 0, 0, r - c[n][0].shape[0]))
                for c, wk in zip(clients, w))
        B = sum((wk / tot) * c[n][2] * torch.nn.functional.pad(c[n][1], (0, r - c[n][1].shape[1]))
                for c, wk in zip(clients, w))
        assert torch.allclose(agg[n].A, A, atol=1e-14) and torch.allclose(agg[n].B, B, atol=1e-14)
        measured = ((B @ A - D[n]).norm() / D[n].norm()).item()
        assert agg.rel_error[n] == pytest.approx(measured, rel=1e-10)
        assert measured > 0.1  # independent random clients: the baseline really is inexact
    assert agg.max_rel_error == max(agg.rel_error.values()) and "rel_error" in repr(agg)


def test_fedavg_is_exact_when_clients_share_A():
    clients = make_clients([3, 3], scales=[0.5, 0.5])
    for n in SHAPES:
        clients[1][n] = (clients[0][n][0], clients[1][n][1], 0.5)
    agg = fed.fedavg(clients, [1, 3])
    assert agg.max_rel_error <= 1e-14


# ---- redistribute -----------------------------------------------------------------------------------------------
def test_redistribute_to_client_ranks_and_scales():
    clients = make_clients([6, 3, 2], scales=[2.0, -0.5, 1.0])
    glob = fed.stack_svd(clients, 5)  # rank-5 global
    G = {n: glob[n].B @ glob[n].A for n in SHAPES}
    outs = fed.redistribute(glob, [clients[0], clients[1], 2])
    assert [o["q"].rank for o in outs] == [6, 3, 2]
    assert [o["q"].scale for o in outs] == [2.0, -0.5, 1.0]
    for n in SHAPES:
        # rank 6 >= 5: exact, zero-padded
        assert torch.allclose(outs[0][n].scale * outs[0][n].B @ outs[0][n].A, G[n], atol=1e-12)
        assert outs[0].rel_error[n] <= 1e-12
        for o, r in ((outs[1], 3), (outs[2], 2)):
            best, S = best_rank(G[n], r)
            assert torch.allclose(o[n].scale * o[n].B @ o[n].A, best, atol=1e-11)
            assert o.rel_error[n] == pytest.approx(math.sqrt(S[r:].square().sum() / S.square().sum()), rel=1e-8)


# ---- server optimisers ------------------------------------------------------------------------------------------
def _loop_reference(kind, xs, deltas_per_round, lr, b1, b2, tau, beta):
    xs = [x.clone() for x in xs]
    m = [torch.zeros_like(x) for x in xs]
    v = [torch.full_like(x, tau**2) for x in xs]
    for deltas in deltas_per_round:
        for i, d in enumerate(deltas):
            if kind == "FedAvgM":
                m[i] = beta * m[i] + d
                xs[i] = xs[i] + lr * m[i]
                continue
            m[i] = b1 * m[i] + (1 - b1) * d
            if kind == "FedAdagrad":
                v[i] = v[i] + d * d
            elif kind == "FedYogi":
                v[i] = v[i] - (1 - b2) * d * d * torch.sign(v[i] - d * d)
            else:
                v[i] = b2 * v[i] + (1 - b2) * d * d
            xs[i] = xs[i] + lr * m[i] / (v[i].sqrt() + tau)
    return xs


@pytest.mark.parametrize("kind", ["FedAvgM", "FedAdagrad", "FedYogi", "FedAdam"])
def test_server_optimizers_match_per_tensor_loops(kind):
    g = torch.Generator().manual_seed(7)
    shapes = [(4, 12), (10, 4), (3, 7), (9, 3)]
    xs = [torch.randn(*s, generator=g, dtype=F64) for s in shapes]
    rounds = [[torch.randn(*s, generator=g, dtype=F64) * 0.1 for s in shapes] for _ in range(4)]
    lr, b1, b2, tau, beta = 0.05, 0.8, 0.95, 1e-2, 0.7
    ref = _loop_reference(kind, xs, rounds, lr, b1, b2, tau, beta)
    params = {f"p{i}": x.clone() for i, x in enumerate(xs)}
    cls = getattr(fed, kind)
    opt = cls(params, lr=lr, beta=beta) if kind == "FedAvgM" else cls(params, lr=lr, betas=(b1, b2), tau=tau)
    for r, deltas in enumerate(rounds):
        if r % 2:
            opt.step([d.clone() for d in deltas])
        else:  # the same pseudo-gradient through step_towards(aggregate)
            opt.step_towards({k: p + d for (k, p), d in zip(params.items(), deltas)})
    assert opt.rounds == 4
    for p, want in zip(params.values(), ref):
        assert torch.allclose(p, want, rtol=1e-12, atol=1e-12)


def test_fedavgm_without_momentum_is_fedavg_on_factor_tensors():
    clients = make_clients([3, 3])
    glob = {n: fed.LoRAFactors(torch.zeros(3, i, dtype=F64), torch.zeros(o, 3, dtype=F64)) for n, (i, o) in
            SHAPES.items()}
    opt = fed.FedAvgM(fed.factor_tensors(glob), lr=1.0, beta=0.0)
    avg = fed.fedavg(clients)
    opt.step_towards(fed.factor_tensors(avg))
    for n in SHAPES:  # the global adapter's own tensors were updated in place
        assert torch.allclose(glob[n].A, avg[n].A, atol=1e-15) and torch.allclose(glob[n].B, avg[n].B, atol=1e-15)


def test_server_optimizer_refusals_change_nothing():
    params = [torch.ones(3, 2), torch.ones(4)]
    opt = fed.FedAdam(params, lr=0.1)
    with pytest.raises(ValueError, match=r"pseudo_grad\[1\]: expected shape \(4,\)"):
        opt.step([torch.ones(3, 2), torch.ones(5)])
    with pytest.raises(ValueError, match="2 tensors"):
        opt.step([torch.ones(3, 2)])
    assert all(torch.equal(p, torch.ones_like(p)) for p in params) and opt.rounds == 0
    with pytest.raises(ValueError, match="betas"):
        fed.FedYogi(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        fed.FedAvgM(params, lr=-1.0)
    with pytest.raises(TypeError, match="floating-point"):
        fed.FedAdagrad([torch.ones(2, dtype=torch.int64)])


def test_fedprox_term_value_and_gradient():
    g = torch.Generator().manual_seed(9)
    w = {"a": torch.randn(3, 4, generator=g, requires_grad=True), "b": torch.randn(5, generator=g, requires_grad=True)}
    w0 = {"b": torch.randn(5, generator=g), "a": torch.randn(3, 4, generator=g)}
    mu = 0.3
    t = fed.fedprox_term(w, w0, mu)
    want = mu / 2 * sum(((w[k].detach() - w0[k]) ** 2).sum() for k in w)
    assert torch.allclose(t, want)
    t.backward()
    for k in w:
        assert torch.allclose(w[k].grad, mu * (w[k].detach() - w0[k]))
    assert fed.fedprox_term([w["b"]], [w0["b"]], 0.0).item() == 0.0
    with pytest.raises(ValueError, match="mu"):
        fed.fedprox_term(w, w0, -1.0)
    with pytest.raises(ValueError, match="shape"):
        fed.fedprox_term([w["a"]], [w0["b"]], 1.0)


# ---- refusals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", ["stack", "fedavg", "stack_svd"])
def test_bad_inputs_are_refused_and_inputs_untouched(agg):
    clients = make_clients([3, 2, 2])
    snap = snapshot(clients)

    def run(cl, w=None, **kw):
        return fed.stack_svd(cl, kw.pop("rank", 2), w) if agg == "stack_svd" else getattr(fed, agg)(cl, w)

    bad_shape = [dict(c) for c in clients]
    bad_shape[2]["o"] = (torch.randn(2, 8, dtype=F64), torch.randn(9, 2, dtype=F64), 1.0)
    with pytest.raises(ValueError, match=r"clients\[2\]\['o'\]: expected in=7, out=9"):
        run(bad_shape)
    missing = [dict(c) for c in clients]
    del missing[1]["k"]
    with pytest.raises(ValueError, match=r"clients\[1\]: expected the layers.*missing \['k'\]"):
        run(missing)
    rank_mismatch = [dict(c) for c in clients]
    rank_mismatch[0]["q"] = (torch.randn(3, 12, dtype=F64), torch.randn(10, 4, dtype=F64))
    with pytest.raises(ValueError, match="same r"):
        run(rank_mismatch)
    with pytest.raises(ValueError, match="non-negative"):
        run(clients, [1.0, -0.5, 1.0])
    with pytest.raises(ValueError, match="not all zero"):
        run(clients, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        run(clients, [1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="3 weights"):
        run(clients, [1.0, 1.0])
    with pytest.raises(TypeError, match="expected a sequence of client adapters"):
        run(clients[0])
    with pytest.raises(ValueError, match="at least one client"):
        run([])
    with pytest.raises(TypeError, match=r"clients\[0\]\['q'\]"):
        run([{"q": "not factors"}])
    with pytest.raises(TypeError, match="dtype"):
        run([{"q": (torch.ones(2, 3, dtype=torch.int32), torch.ones(4, 2, dtype=torch.int32))}])
    if agg == "stack_svd":
        with pytest.raises(ValueError, match=r"rank: expected <= min\(stacked rank 7"):
            fed.stack_svd(clients, 8)
        with pytest.raises(ValueError, match="rank: expected an int >= 1"):
            fed.stack_svd(clients, 0)
        with pytest.raises(ValueError, match="method"):
            fed.stack_svd(clients, 2, method="svd")
    assert unchanged(clients, snap)


def test_redistribute_refusals():
    glob = fed.stack(make_clients([2, 2]))
    with pytest.raises(ValueError, match="a rank >= 1"):
        fed.redistribute(glob, [2, 0])
    with pytest.raises(ValueError, match="non-zero scale"):
        fed.redistribute(glob, [make_clients([2], scales=[0.0])[0]])
    with pytest.raises(ValueError, match="the layers of global_adapter"):
        fed.redistribute(glob, [{"q": glob["q"]}])


@pytest.mark.cuda
def test_cuda_aggregation_and_optimizers_match_cpu():
    ranks, w = [16, 8, 4, 4], [1.0, 2.0, 3.0, 4.0]
    shapes = {"q": (256, 256), "o": (256, 128)}
    cpu = make_clients(ranks, shapes=shapes)
    gpu = [{n: (v[0].cuda().float(), v[1].cuda().float(), v[2]) for n, v in c.items()} for c in cpu]
    D = dense_sum(cpu, w)
    for name, fn in (("stack", lambda c: fed.stack(c, w)), ("stack_svd", lambda c: fed.stack_svd(c, 12, w)),
                     ("fedavg", lambda c: fed.fedavg(c, w))):
        a, b = fn(cpu), fn(gpu)
        for n in shapes:
            assert b[n].A.is_cuda and b[n].A.dtype == torch.float32
            pa, pb = a[n].B @ a[n].A, (b[n].B @ b[n].A).double().cpu()
            assert torch.allclose(pb, pa, rtol=0, atol=1e-5 * D[n].abs().max().item()), (name, n)
            if name != "stack":
                assert b.rel_error[n] == pytest.approx(a.rel_error[n], rel=1e-3, abs=1e-6)
    xs = [torch.randn(64, 256, dtype=F64), torch.randn(256, 64, dtype=F64)]
    ds = [torch.randn_like(x) * 0.1 for x in xs]
    for kind in ("FedAvgM", "FedAdagrad", "FedYogi", "FedAdam"):
        pc, pg = [x.clone() for x in xs], [x.cuda() for x in xs]
        oc, og = getattr(fed, kind)(pc, lr=0.1), getattr(fed, kind)(pg, lr=0.1)
        for _ in range(3):
            oc.step(ds)
            og.step([d.cuda() for d in ds])
        for a, b in zip(pc, pg):
            assert torch.allclose(b.cpu(), a, rtol=1e-10, atol=1e-10), kind
