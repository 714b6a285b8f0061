"""lora_kernels.federated.distributed on 2 and 4 gloo processes (CPU) equals single-process aggregation; invalid
inputs on one process are refused on every process (no hang, nothing aggregated); the federated_round example
runs in one process and under torchrun."""

import datetime
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lora_kernels.federated as fed

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {"q": (12, 10), "k": (12, 10), "o": (7, 9)}
RANKS = [5, 3, 2, 4, 1, 6]
WEIGHTS = [1.0, 2.0, 0.5, 3.0, 1.5, 1.0]
COUNTS = {2: [2, 4], 4: [1, 1, 2, 2]}  # clients per process (uneven on purpose)


def make_clients(shapes=SHAPES):
    g = torch.Generator().manual_seed(0)
    return [{n: fed.LoRAFactors(torch.randn(r, i, generator=g, dtype=torch.float64),
                                torch.randn(o, r, generator=g, dtype=torch.float64), 2.0 / r)
             for n, (i, o) in shapes.items()} for r in RANKS]


SCENARIOS = {  # name -> aggregate() options
    "stack_factors": dict(method="stack", route="factors"),
    "stack_dense": dict(method="stack", route="dense"),
    "stack_auto": dict(method="stack"),
    "svd_factors": dict(method="stack_svd", target_rank=4, route="factors"),
    "svd_dense": dict(method="stack_svd", target_rank=4, route="dense"),
    "fedavg": dict(method="fedavg"),
    "fedavg_reduce": dict(method="fedavg", report_error=False),
}


def _scenarios(rank, world, group, out_dir):
    """Every aggregation scenario and refusal on ``group`` (``world`` processes); results saved per rank."""
    counts = COUNTS[world]
    lo = sum(counts[:rank])
    hi = lo + counts[rank]
    clients = make_clients()
    mine, w = clients[lo:hi], WEIGHTS[lo:hi]
    agg_fn = fed.distributed.aggregate
    res = {}
    for name, kw in SCENARIOS.items():
        agg = agg_fn(mine, weights=w, group=group, clients_per_process=counts, num_clients=len(RANKS), **kw)
        res[name] = ({n: (f.A, f.B, f.scale) for n, f in agg.items()}, dict(agg.rel_error), list(agg.notes))
    errors = {}

    def expect_error(tag, fn):
        try:
            fn()
            errors[tag] = "no error"
        except (ValueError, TypeError) as e:
            errors[tag] = f"{type(e).__name__}: {e}"

    bad_w = list(w)
    if rank == world - 1:
        bad_w[0] = -1.0
    expect_error("negative_weight", lambda: agg_fn(mine, weights=bad_w, group=group))
    expect_error("zero_weights", lambda: agg_fn(mine, weights=[0.0] * len(mine), group=group))
    bad_shape = mine
    if rank == 0:
        bad_shape = make_clients({"q": (12, 10), "k": (12, 10), "o": (7, 8)})[lo:hi]
    expect_error("layer_shapes", lambda: agg_fn(bad_shape, group=group))
    expect_error("group_size", lambda: agg_fn(mine, group=group, clients_per_process=counts + [1]))
    expect_error("too_many_processes", lambda: agg_fn(mine, group=group, num_clients=world - 1))
    expect_error("target_rank", lambda: agg_fn(mine, "stack_svd", target_rank=22, group=group))
    # the group still works after every refusal (no process is left waiting in a collective)
    after = agg_fn(mine, weights=w, group=group, route="factors")
    res["after_errors"] = ({n: (f.A, f.B, f.scale) for n, f in after.items()}, {}, [])
    torch.save({"res": res, "errors": errors}, os.path.join(out_dir, f"world{world}_rank{rank}.pt"))


def _join(ctx, deadline_s):
    """Join the workers, or kill them and fail after ``deadline_s`` (a hung collective must not hang CI)."""
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=2):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers still running after {deadline_s} s (a collective hung)")


def _worker(rank, world, init_file, out_dir):
    # One spawn serves both sizes: the 4-process world, and a 2-process subgroup of ranks 0 and 1.
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
def single():
    clients = make_clients()
    return {
        "stack": fed.stack(clients, WEIGHTS),
        "stack_svd": fed.stack_svd(clients, 4, WEIGHTS),
        "fedavg": fed.fedavg(clients, WEIGHTS),
    }


@pytest.fixture(scope="module")
def gloo_results():
    # fork: the children inherit the imported torch (a spawned child spends seconds importing it again); the
    # parent never initialises torch.distributed, and the children run single-threaded.
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(4, os.path.join(tmp, "store"), tmp), nprocs=4, join=False,
                                 start_method="fork")
        _join(ctx, deadline_s=120)
        yield {w: [torch.load(os.path.join(tmp, f"world{w}_rank{r}.pt")) for r in range(w)] for w in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_aggregation_equals_single_process(world, single, gloo_results):
    results = gloo_results[world]
    for r, out in enumerate(results):
        res = out["res"]
        for name, (layers, rel, notes) in res.items():
            base = name.split("_")[0]
            ref = single["stack_svd" if base == "svd" else "stack" if base == "after" else base]
            for n in SHAPES:
                A, B, s = layers[n]
                prod, want = s * B @ A, ref[n].B @ ref[n].A
                if name in ("stack_factors", "svd_factors", "fedavg", "after_errors"):
                    # factor route: the single-process computation on the same data, bit for bit
                    assert torch.equal(A, ref[n].A) and torch.equal(B, ref[n].B), (world, r, name, n)
                else:
                    assert torch.allclose(prod, want, rtol=0, atol=1e-12 * want.abs().max().item()), (name, n)
            if name.startswith("svd") or name.startswith("fedavg") and name != "fedavg_reduce":
                for n in SHAPES:
                    assert rel[n] == pytest.approx(ref.rel_error[n], rel=1e-9), (name, n)
            if name == "fedavg_reduce":
                assert not rel and any("NOT measured" in x for x in notes)
        assert any("dense all_reduce" in x for x in res["stack_dense"][2])
        assert res["stack_dense"][0]["q"][0].shape == (10, 12)  # exact (D, I) form of rank min(in, out)
        assert any("factor all_gather" in x for x in res["stack_factors"][2])
        # every process got the same aggregate
        for name in res:
            for n in SHAPES:
                assert torch.equal(res[name][0][n][0], results[0]["res"][name][0][n][0])
        errs = out["errors"]
        assert "non-negative" in errs["negative_weight"] and "refused" in errs["negative_weight"] or (
            r != world - 1 and f"process(es) [{world - 1}]" in errs["negative_weight"]), errs["negative_weight"]
        assert "not all zero" in errs["zero_weights"], errs["zero_weights"]
        assert "same layer names and (in, out) on every process" in errs["layer_shapes"], errs["layer_shapes"]
        assert f"a process group of size len(clients_per_process)={world + 1}, got size {world}" in \
            errs["group_size"], errs["group_size"]
        assert "stacked rank 21" in errs["target_rank"], errs["target_rank"]
        assert f"at most num_clients={world - 1} processes" in errs["too_many_processes"]


def test_aggregate_needs_an_initialised_group():
    with pytest.raises(RuntimeError, match="not initialised"):
        fed.distributed.aggregate(make_clients()[:2])


def test_choose_route_by_bytes():
    # 64 x 64 layer, 2 processes: factors of stacked rank 16 per process are cheaper than the dense delta ...
    assert fed.distributed.choose_route("stack", [(64, 64)], 2, 16 * 128) == "factors"
    # ... rank 64 per process is not.
    assert fed.distributed.choose_route("stack", [(64, 64)], 2, 64 * 128) == "dense"
    assert fed.distributed.choose_route("fedavg", [(64, 64)], 2, 1, report_error=False) == "reduce_factors"


def _load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("federated_round", ROOT / "python" / "federated_round.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_federated_round_example_single_process(capsys):
    assert _load_example().main(["--rounds", "1", "--local-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "stack_svd round 0" in out and "fedavg round 0" in out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_federated_round_example_under_torchrun():
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "python" / "federated_round.py"), "--rounds", "1", "--local-steps", "3"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 processes (gloo)" in p.stdout and "OK:" in p.stdout
    assert "distributed aggregate vs single-process" in p.stdout


def _nccl_worker(rank, init_file, out_dir):
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.cuda.set_device(0)
        clients = [{n: fed.LoRAFactors(f.A.cuda(), f.B.cuda(), f.scale) for n, f in c.items()} for c in make_clients()]
        out = {}
        for name, kw in SCENARIOS.items():
            agg = fed.distributed.aggregate(clients, weights=WEIGHTS, **kw)
            assert all(f.A.is_cuda for f in agg.values())
            out[name] = {n: (f.scale * f.B @ f.A).cpu() for n, f in agg.items()}
        torch.save(out, os.path.join(out_dir, "nccl.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_nccl_single_gpu_matches_single_process(single):
    """NCCL on the one GPU a session has (world size 1): the CUDA comm path and CUDA clients end to end."""
    if not dist.is_nccl_available():
        pytest.skip("torch built without NCCL")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_nccl_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=1, join=False,
                                 start_method="spawn")
        _join(ctx, deadline_s=120)
        out = torch.load(os.path.join(tmp, "nccl.pt"))
    for name, layers in out.items():
        base = name.split("_")[0]
        ref = single["stack_svd" if base == "svd" else base]
        for n, prod in layers.items():
            want = ref[n].scale * ref[n].B @ ref[n].A
            assert torch.allclose(prod, want, rtol=0, atol=1e-10 * want.abs().max().item()), (name, n)
