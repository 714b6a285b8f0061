"""lora_kernels.tensor_parallel: the shards hold the right rows (one process), every scheme on 2 and 4 gloo
processes (CPU, reference backend) equals the unsharded add_lora_ (mixed ranks, per-slice ranks, unequal q/k/v
widths, -1 tokens and a free slot untouched, mixed mode), refusals are raised on every rank with the group still
usable after them, and the tp_lora example runs under torchrun."""

import datetime
import os
import pathlib
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lora_kernels as lk
from helpers import make_weights, weights_on
from lora_kernels import tensor_parallel as tp
from test_federated_distributed import _free_port, _join  # the fork pool's deadline join, torchrun's port

ROOT = pathlib.Path(__file__).resolve().parents[1]
IN = 16
OUTS = (16, 8, 8)  # q/k/v of unequal widths, each divisible by 2 and 4
# per-slice ranks (mixed across adapters and slices; 5 and 3 are not multiples of tp); slot 5 stays free
RANKS = [(4, 4, 4), (8, 2, 8), (16, 16, 16), (5, 3, 5), (1, 1, 1)]
N_SLOTS = 6
MERGED = 2
IDS = [0, 1, -1, 2, 3, 1, 5, 0, -1, 3, 2, 4, 2]  # 5: a free slot (rank 0), -1: no adapter


def layer(outs=OUTS):
    """The full weights (churned: rank-paged rows out of id order), ids, x and the base weight: identical on
    every process (fixed seed)."""
    g = torch.Generator().manual_seed(7)
    w = make_weights(IN, outs, RANKS, generator=g, max_adapters=N_SLOTS, churn=True)
    ids = torch.tensor(IDS, dtype=torch.int32)
    x = torch.randn(len(IDS), IN, generator=g)
    W0 = torch.randn(sum(outs), IN, generator=g)
    return w, ids, x, W0


def local_cols(w, k, size):
    """The columns of y rank k owns in a column-parallel layer: its rows of every slice."""
    return torch.cat([torch.arange(c0 + k * (o // size), c0 + (k + 1) * (o // size))
                      for c0, o in zip(w.slice_cols, w.slice_outs)])


def untouched(ids, merged=None):
    """Tokens whose y rows must stay bit-identical: -1 and the free slot, or (mixed mode) the merged adapter's."""
    if merged is not None:
        return ids == merged
    return (ids == -1) | (ids == 5)


# ---- one process: which rows go where -----------------------------------------------------------------------


def test_column_shard_splits_b_per_slice_and_replicates_a():
    w, *_ = layer()
    for size in (2, 4):
        for k in range(size):
            sh = tp.shard_weights(w, k, size, "column")
            assert sh.expand_weights == (sh.weights,)
            assert sh.weights.slice_outs == tuple(o // size for o in OUTS) and sh.in_features == IN
            assert torch.equal(sh.weights.b, w.b[:, local_cols(w, k, size)])
            assert torch.equal(sh.weights.a, w.a)
            assert torch.equal(sh.weights.offsets, w.offsets) and torch.equal(sh.weights.ranks, w.ranks)
            assert torch.equal(sh.weights.scales, w.scales) and sh.weights._alloc == w._alloc
            assert sh.weights.max_rank == w.max_rank and sh.weights.loaded == w.loaded
            assert sh.weights.b.untyped_storage().data_ptr() != w.b.untyped_storage().data_ptr()  # a snapshot
            assert sh.weights.a.untyped_storage().data_ptr() != w.a.untyped_storage().data_ptr()


def test_row_shard_splits_a_by_input_columns():
    w, *_ = layer()
    for size in (2, 4):
        n = IN // size
        for k in range(size):
            sh = tp.shard_weights(w, k, size, "row")
            assert sh.in_features == n and sh.out_features == sum(OUTS)
            assert torch.equal(sh.weights.a, w.a[:, :, k * n : (k + 1) * n]) and torch.equal(sh.weights.b, w.b)
            fs = tp.shard_weights(w, k, size, "row", fully_sharded=True)
            assert torch.equal(fs.weights.a, w.a[:, :, k * n : (k + 1) * n]) and fs.weights.b.isnan().all()
            assert len(fs.expand_weights) == len(OUTS)
            for s, (c0, o) in enumerate(zip(w.slice_cols, w.slice_outs)):
                ws = fs.expand_weights[s]
                m = o // size
                assert torch.equal(ws.b, w.b[:, c0 + k * m : c0 + (k + 1) * m]) and ws.slice_outs == (m,)
                assert torch.equal(ws.ranks, w.ranks[s : s + 1]) and torch.equal(ws.scales, w.scales[s : s + 1])
                assert ws.max_rank == w.max_rank


def test_fully_sharded_column_interleaves_rank_rows():
    w, *_ = layer()
    for size in (2, 4):
        for k in range(size):
            sh = tp.shard_weights(w, k, size, "column", fully_sharded=True)
            wa, (wb,) = sh.weights, sh.expand_weights
            assert wa.max_rank == -(-w.max_rank // size) and wb.max_rank == w.max_rank
            assert torch.equal(wb.b, w.b[:, local_cols(w, k, size)]) and wb.a.isnan().all()
            assert torch.equal(wa.ranks, (w.ranks - k + size - 1) // size)  # ceil((r - k) / tp) rows j % tp == k
            for i in w.loaded:
                off, n = w.rows_of(i)
                loff, ln = wa.rows_of(i)
                assert ln == -(-n // size) and int(wa.offsets[i]) == loff
                for q in range(ln):
                    j = q * size + k  # local row q holds the adapter's row j, or zeros past its rows
                    want = w.a[:, off + j] if j < n else torch.zeros_like(w.a[:, 0])
                    assert torch.equal(wa.a[:, loff + q], want), (size, k, i, q)
            assert sh.nbytes < tp.shard_weights(w, k, size, "column").nbytes


def test_gathered_rank_rows_reassemble_the_full_shrink():
    # the fully sharded column's h: the per-rank shrinks, interleaved, are the unsharded shrink (one process)
    w, ids, x, _ = layer()
    batch = lk.LoRABatch.from_ids(ids, N_SLOTS)
    full = lk.shrink(x, w, batch)
    for size in (2, 4):
        hs = [lk.shrink(x, tp.shard_weights(w, k, size, "column", fully_sharded=True).weights, batch)
              for k in range(size)]
        S, T, c = hs[0].shape
        got = torch.stack(hs).permute(1, 2, 3, 0).reshape(S, T, c * size)[:, :, : w.max_rank]
        torch.testing.assert_close(got, full, rtol=1e-6, atol=1e-6)


def test_plain_shards_serve_without_torch_distributed():
    # no collective: a single process can serve (simulate) every rank's share with the same ops
    w, ids, x, W0 = layer()
    batch = lk.LoRABatch.from_ids(ids, N_SLOTS)
    y0 = x @ W0.t()
    want = lk.add_lora_(y0.clone(), x, w, batch)
    size = 4
    for k in range(size):
        y = y0[:, local_cols(w, k, size)].clone()
        tp.column_parallel_add_lora_(y, x, tp.shard_weights(w, k, size, "column"), batch)
        torch.testing.assert_close(y, want[:, local_cols(w, k, size)], rtol=1e-5, atol=1e-5)
    n = IN // size
    total = sum(lk.add_lora_(x[:, k * n : (k + 1) * n] @ W0[:, k * n : (k + 1) * n].t(), x[:, k * n : (k + 1) * n],
                             tp.shard_weights(w, k, size, "row").weights, batch) for k in range(size))
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)
    sh = tp.shard_weights(w, 0, size, "column", fully_sharded=True)
    with pytest.raises(RuntimeError, match="not initialised"):
        tp.column_parallel_add_lora_(y0[:, local_cols(w, 0, size)].clone(), x, sh, batch)


def test_shard_refusals():
    w, *_ = layer()
    with pytest.raises(ValueError, match=r"tp_size: expected a divisor of every slice's out_features \[16, 8, 8\]"):
        tp.shard_weights(w, 0, 3, "column")
    with pytest.raises(ValueError, match="tp_size: expected a divisor of in_features=16"):
        tp.shard_weights(w, 0, 3, "row")
    w6, *_ = layer((12, 6, 6))
    tp.shard_weights(w6, 1, 8, "row")  # row: only in is split
    with pytest.raises(ValueError, match="tp_size: expected a divisor of every slice"):
        tp.shard_weights(w6, 1, 8, "row", fully_sharded=True)
    with pytest.raises(ValueError, match="tp_rank: expected an integer <= 1"):
        tp.shard_weights(w, 2, 2, "column")
    with pytest.raises(ValueError, match="layer: expected one of"):
        tp.shard_weights(w, 0, 2, "columns")
    with pytest.raises(TypeError, match="weights: expected a LoRAWeights"):
        tp.shard_weights(w.a, 0, 2, "column")
    with pytest.raises(TypeError, match="fully_sharded: expected a bool"):
        tp.shard_weights(w, 0, 2, "column", fully_sharded=1)
    sh = tp.shard_weights(w, 0, 2, "row")
    _, ids, x, _ = layer()
    batch = lk.LoRABatch.from_ids(ids, N_SLOTS)
    with pytest.raises(ValueError, match="shard: expected a column-parallel shard"):
        tp.column_parallel_add_lora_(torch.zeros(len(IDS), 16), x, sh, batch)
    with pytest.raises(ValueError, match="reduce: expected one of"):
        tp.row_parallel_add_lora_(torch.zeros(len(IDS), 32), x[:, :8], sh, batch, reduce="y")
    with pytest.raises(TypeError, match="shard: expected a TPShard"):
        tp.row_parallel_add_lora_(torch.zeros(len(IDS), 32), x[:, :8], sh.weights, batch)


# ---- gloo on 2 and 4 processes ----------------------------------------------------------------------------


def scheme_runs(rank, size, group, layer_all_reduce=None):
    """The layer, its batch and this rank's slices of it, and two runners recording into ``res``:
    ``column(name, fully_sharded=False, merged=None, **kw)`` and ``row(name, reduce, fully_sharded=False,
    merged=None, **kw)`` run one scheme on ``group`` (this process is ``rank`` of ``size`` there) and keep got / want
    (the unsharded add_lora_) / before / after / keep (the rows that must stay bit-identical).
    ``layer_all_reduce(y) -> y`` is the row-parallel layer's own reduce of its partial output (default:
    torch.distributed.all_reduce on ``group``; an engine's test passes the engine's)."""
    w, ids, x, W0 = layer()
    batch = lk.LoRABatch.from_ids(ids, N_SLOTS)
    n = IN // size
    x_k, W0_k = x[:, rank * n : (rank + 1) * n], W0[:, rank * n : (rank + 1) * n]
    cols = local_cols(w, rank, size)
    y_full = x @ W0.t()
    res = {}

    def all_reduce(y):
        dist.all_reduce(y, group=group)
        return y

    reduce_layer = layer_all_reduce or all_reduce

    def column(name, fully_sharded=False, merged=None, **kw):
        sh = tp.shard_weights(w, rank, size, "column", fully_sharded=fully_sharded)
        want = lk.add_lora_(y_full.clone(), x, w, batch, merged=merged)[:, cols]
        y = y_full[:, cols].clone()
        before = y.clone()
        tp.column_parallel_add_lora_(y, x, sh, batch, group=group, merged=merged, **kw)
        res[name] = dict(got=y, want=want, before=before, after=y, keep=untouched(ids, merged))

    def row(name, reduce, fully_sharded=False, merged=None, **kw):
        sh = tp.shard_weights(w, rank, size, "row", fully_sharded=fully_sharded)
        want = lk.add_lora_(y_full.clone(), x, w, batch, merged=merged)
        y = (x_k @ W0_k.t()) if reduce == "caller" else y_full.clone()  # partial (before the reduce) or full
        before = y.clone()
        tp.row_parallel_add_lora_(y, x_k, sh, batch, group=group, reduce=reduce, merged=merged, **kw)
        after = y.clone()
        if reduce == "caller":
            y = reduce_layer(y)  # the layer's own all_reduce sums base and LoRA partials
        res[name] = dict(got=y, want=want, before=before, after=after, keep=untouched(ids, merged))

    return SimpleNamespace(w=w, ids=ids, x=x, x_k=x_k, batch=batch, y_full=y_full, cols=cols, res=res,
                           column=column, row=row)


def _scenarios(rank, size, group, out_dir):
    """Every scheme and op on ``group`` (``size`` processes) against the unsharded add_lora_, then the refusals;
    results saved per rank for the parent to check."""
    run = scheme_runs(rank, size, group)
    w, ids, x, x_k, batch, y_full, cols, res = run.w, run.ids, run.x, run.x_k, run.batch, run.y_full, run.cols, run.res
    column, row = run.column, run.row

    column("column")
    column("column_mixed", merged=MERGED)
    column("column_fully_sharded", fully_sharded=True)
    column("column_fully_sharded_unchecked", fully_sharded=True, check_peers=False)
    row("row_caller", "caller")
    row("row_caller_mixed", "caller", merged=MERGED)
    row("row_h", "h")
    row("row_h_unchecked", "h", check_peers=False)
    row("row_fully_sharded", "caller", fully_sharded=True)

    errors = {}

    def expect_error(tag, fn, y):
        before = y.clone()
        try:
            fn(y)
            errors[tag] = ("no error", True)
        except (ValueError, TypeError, RuntimeError) as e:
            errors[tag] = (f"{type(e).__name__}: {e}", torch.equal(y, before))

    col_fs = tp.shard_weights(w, rank, size, "column", fully_sharded=True)
    row_sh = tp.shard_weights(w, rank, size, "row")
    last = rank == size - 1
    # bad inputs on one rank only: every rank refuses, naming x, and nothing is written anywhere
    expect_error("x_width_on_last", lambda y: tp.column_parallel_add_lora_(
        y, x[:, :-1] if last else x, col_fs, batch, group=group), y_full[:, cols].clone())
    expect_error("x_dtype_on_first", lambda y: tp.row_parallel_add_lora_(
        y, x_k.to(torch.int32) if rank == 0 else x_k, row_sh, batch, group=group, reduce="h"), y_full.clone())
    short = lk.LoRABatch.from_ids(ids[:-1], N_SLOTS)  # rank 0 serves one token fewer (consistent by itself)
    expect_error("tokens_differ", lambda y: tp.row_parallel_add_lora_(
        y[:-1] if rank == 0 else y, x_k[:-1] if rank == 0 else x_k, row_sh, short if rank == 0 else batch,
        group=group, reduce="h"), y_full.clone())
    wrong = tp.shard_weights(w, (rank + 1) % size, size, "column", fully_sharded=True)
    expect_error("shard_of_another_rank", lambda y: tp.column_parallel_add_lora_(y, x, wrong, batch, group=group),
                 y_full[:, cols].clone())
    expect_error("merged_with_h", lambda y: tp.row_parallel_add_lora_(
        y, x_k, row_sh, batch, group=group, reduce="h", merged=MERGED), y_full.clone())
    expect_error("y_shape_on_last", lambda y: tp.row_parallel_add_lora_(
        y[:, :-1] if last else y, x_k, row_sh, batch, group=group, reduce="h"), y_full.clone())
    # a no-communication op refuses locally (the world's shard in a subgroup, or the other way round)
    expect_error("plain_shard_of_another_rank", lambda y: tp.column_parallel_add_lora_(
        y, x, tp.shard_weights(w, (rank + 1) % size, size, "column"), batch, group=group), y_full[:, cols].clone())
    empty = lk.LoRABatch.from_ids(ids[:0], N_SLOTS)  # T = 0: agreed by the header, then no payload collective
    expect_error("empty_batch", lambda y: (
        tp.column_parallel_add_lora_(y, x[:0], col_fs, empty, group=group),
        tp.row_parallel_add_lora_(y_full[:0].clone(), x_k[:0], row_sh, empty, group=group, reduce="h")),
        y_full[:0, cols].clone())
    # the group still works after every refusal (no rank is left waiting in a collective)
    row("after_errors", "h")
    torch.save({"res": res, "errors": errors}, os.path.join(out_dir, f"world{size}_rank{rank}.pt"))


def _worker(rank, world, init_file, out_dir):
    # One fork serves both sizes: the 4-process world, and a 2-process subgroup of ranks 0 and 1 (an engine's
    # tensor-parallel group is often not the world).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        pair = dist.new_group([0, 1])  # every process must take part in creating it
        if rank < 2:
            _scenarios(rank, 2, pair, out_dir)
        dist.barrier()
        _scenarios(rank, world, None, out_dir)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results():
    # fork: the children inherit the imported torch (a spawned child spends seconds importing it again)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(4, os.path.join(tmp, "store"), tmp), nprocs=4, join=False,
                                 start_method="fork")
        _join(ctx, deadline_s=120)
        yield {w: [torch.load(os.path.join(tmp, f"world{w}_rank{r}.pt")) for r in range(w)] for w in (2, 4)}


SCHEMES = ("column", "column_mixed", "column_fully_sharded", "column_fully_sharded_unchecked", "row_caller",
           "row_caller_mixed", "row_h", "row_h_unchecked", "row_fully_sharded", "after_errors")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_sharded_equals_unsharded(world, scheme, gloo_results):
    for r, out in enumerate(gloo_results[world]):
        c = out["res"][scheme]
        torch.testing.assert_close(c["got"], c["want"], rtol=1e-5, atol=1e-5, msg=f"world {world} rank {r}")
        keep = c["keep"]
        assert keep.any() and torch.equal(c["after"][keep], c["before"][keep]), (world, r)  # bit-identical rows
        assert not torch.equal(c["after"][~keep], c["before"][~keep])  # and the others were written


@pytest.mark.parametrize("world", [2, 4])
def test_refusals_on_every_rank(world, gloo_results):
    last = world - 1
    for r, out in enumerate(gloo_results[world]):
        errs = out["errors"]
        for tag, (msg, y_same) in errs.items():
            assert y_same, (tag, r, msg)  # y unchanged wherever it was refused
        msg = errs["x_width_on_last"][0]
        if r == last:
            assert msg.startswith("ValueError: x: expected shape (T, 16)") and "refused on every rank" in msg, msg
        else:
            assert msg == (f"ValueError: x: expected valid inputs on every rank of the group, got a refusal on "
                           f"rank(s) [{last}] (ValueError there, naming x); nothing was written"), msg
        msg = errs["x_dtype_on_first"][0]
        assert msg.startswith("TypeError: x: expected dtype in") if r == 0 else \
            msg.startswith("TypeError: x: expected valid inputs on every rank") and "rank(s) [0]" in msg, msg
        assert errs["tokens_differ"][0] == (
            f"ValueError: x: expected the same number of tokens on every rank of the group, got "
            f"{[len(IDS) - 1] + [len(IDS)] * (world - 1)} per rank")
        msg = errs["shard_of_another_rank"][0]
        assert msg.startswith(f"ValueError: shard: expected a shard made for rank {r} of a group of {world}, got "
                              f"one for rank {(r + 1) % world} of {world}") and "refused on every rank" in msg, msg
        assert errs["merged_with_h"][0].startswith("ValueError: merged: expected None for reduce='h'"), r
        msg = errs["y_shape_on_last"][0]
        assert msg.startswith("ValueError: y: expected shape (13, 32)" if r == last else
                              f"ValueError: y: expected valid inputs on every rank of the group, got a refusal on "
                              f"rank(s) [{last}]"), msg
        assert errs["empty_batch"][0] == "no error", errs["empty_batch"]
        assert errs["plain_shard_of_another_rank"][0].startswith(
            f"ValueError: shard: expected a shard made for rank {r} of a group of {world}"), r


def test_tp_lora_example_under_torchrun():
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "python" / "tp_lora.py"), "--tokens", "12"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 ranks (gloo)" in p.stdout and "OK:" in p.stdout, p.stdout
    for scheme in ("plain", "fully sharded"):
        assert f"{scheme}: max |sharded - unsharded|" in p.stdout, p.stdout


def _nccl_worker(rank, init_file, out_dir):
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.cuda.set_device(0)
        w, ids, x, W0 = layer()  # full weights on the host; shards made onto the GPU (device=)
        ids, x, W0 = ids.cuda(), x.cuda(), W0.cuda()
        batch = lk.LoRABatch.from_ids(ids, N_SLOTS)
        y0 = x @ W0.t()
        want = lk.add_lora_(y0.clone(), x, weights_on(w, "cuda"), batch)
        out = {}
        for fully_sharded in (False, True):  # tp = 1: the NCCL collectives and the Triton kernels on every shard
            col = tp.shard_weights(w, 0, 1, "column", fully_sharded=fully_sharded, device="cuda")
            out[f"column_{fully_sharded}"] = tp.column_parallel_add_lora_(y0.clone(), x, col, batch)
            row = tp.shard_weights(w, 0, 1, "row", fully_sharded=fully_sharded, device="cuda")
            out[f"row_caller_{fully_sharded}"] = tp.row_parallel_add_lora_(y0.clone(), x, row, batch)
        out["row_h"] = tp.row_parallel_add_lora_(y0.clone(), x, tp.shard_weights(w, 0, 1, "row", device="cuda"), batch,
                                               reduce="h")
        torch.save({"want": want.cpu(), "got": {k: v.cpu() for k, v in out.items()}}, os.path.join(out_dir, "nccl.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_nccl_single_gpu_matches_unsharded():
    """NCCL on the one GPU a session has (a group of 1): the CUDA comm path and the Triton kernels on every shard
    (the placeholders, the per-slice expand into strided views of y)."""
    if not dist.is_nccl_available():
        pytest.skip("torch built without NCCL")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_nccl_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=1, join=False,
                                 start_method="spawn")
        _join(ctx, deadline_s=180)
        out = torch.load(os.path.join(tmp, "nccl.pt"))
    for name, got in out["got"].items():
        torch.testing.assert_close(got, out["want"], rtol=1e-4, atol=1e-4, msg=name)
