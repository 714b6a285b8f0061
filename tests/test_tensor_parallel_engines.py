"""lora_kernels.tensor_parallel inside a serving engine's own tensor-parallel process group: 2 forked processes
initialise vLLM's distributed environment (its CPU platform, backend gloo, tensor_model_parallel_size=2), take
vLLM's TP ``GroupCoordinator`` and run every scheme with ``group=`` its gloo group, the layer's reduce done by
vLLM's own ``tensor_model_parallel_all_reduce`` / ``GroupCoordinator.all_reduce``; the results equal the
unsharded add_lora_ (mixed ranks, -1 tokens and a free slot untouched). The same for SGLang's parallel_state
when SGLang is importable.

The engines are imported in the fixtures, not at collection: importing vLLM's parallel_state binds
vllm.triton_utils, which tests/test_vllm_plugin.py must import first (with CUDA_VISIBLE_DEVICES='')."""

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lora_kernels import tensor_parallel as tp
from test_federated_distributed import _join
from test_tensor_parallel import MERGED, scheme_runs

TP_SIZE = 2


def _cpu_capable_group(coordinator):
    """The coordinator's process group that communicates CPU tensors: its device group if the engine made it gloo
    (it does with backend="gloo"), else its gloo ``cpu_group``."""
    if dist.get_backend(coordinator.device_group) == "gloo":
        return coordinator.device_group
    return coordinator.cpu_group


def _engine_scenarios(rank, size, group, layer_all_reduce, out_dir, tag):
    """Every scheme on the engine's TP group (this process is ``rank`` of ``size`` there) against the unsharded
    add_lora_; ``layer_all_reduce(y) -> y`` is the engine's own reduce of a row-parallel layer's partial output.
    Results saved for the parent to check."""
    run = scheme_runs(rank, size, group, layer_all_reduce)
    column, row = run.column, run.row
    column("column")
    column("column_mixed", merged=MERGED)
    column("column_fully_sharded", fully_sharded=True)
    row("row_caller", "caller")
    row("row_caller_mixed", "caller", merged=MERGED)
    row("row_h", "h")
    row("row_fully_sharded", "caller", fully_sharded=True)
    # a shard made for the other rank is refused on every rank of the engine's group (the header's all_gather)
    wrong = tp.shard_weights(run.w, (rank + 1) % size, size, "column", fully_sharded=True)
    try:
        tp.column_parallel_add_lora_(run.y_full[:, run.cols].clone(), run.x, wrong, run.batch, group=group)
        refusal = "no error"
    except ValueError as e:
        refusal = str(e)
    row("after_refusal", "h")  # the engine's group still works after it
    torch.save({"res": run.res, "refusal": refusal, "rank": rank, "size": size},
               os.path.join(out_dir, f"{tag}_rank{rank}.pt"))


# ---- vLLM ---------------------------------------------------------------------------------------------------


def _vllm_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    # vLLM's CPU backend in this child whatever the host has (on a GPU host the CUDA platform would bind each
    # rank to cuda:<rank> and open NCCL); its communicator falls back to torch.distributed without vllm._C's
    # shared-memory ops
    vllm.platforms.current_platform = CpuPlatform()
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.distributed.communication_op import tensor_model_parallel_all_reduce

    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        ps.init_distributed_environment(TP_SIZE, rank, f"file://{init_file}", rank, backend="gloo",
                                        timeout=datetime.timedelta(seconds=60))
        ps.initialize_model_parallel(tensor_model_parallel_size=TP_SIZE)
    try:
        g = ps.get_tp_group()
        group = _cpu_capable_group(g)
        with open(os.path.join(out_dir, f"vllm_group{rank}.txt"), "w") as f:
            f.write(f"{dist.get_backend(g.device_group)} {dist.get_backend(g.cpu_group)} "
                    f"{type(g.device_communicator).__name__}")
        _engine_scenarios(g.rank_in_group, g.world_size, group, tensor_model_parallel_all_reduce, out_dir, "vllm_tp")
        _engine_scenarios(g.rank_in_group, g.world_size, group, g.all_reduce, out_dir, "vllm_coordinator")
    finally:
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()


def _run_workers(worker, deadline_s=90):
    """Fork ``TP_SIZE`` workers (they inherit the parent's imports); the folder holds what each rank saved."""
    tmp = tempfile.TemporaryDirectory()
    ctx = mp.start_processes(worker, args=(os.path.join(tmp.name, "store"), tmp.name), nprocs=TP_SIZE, join=False,
                             start_method="fork")
    _join(ctx, deadline_s=deadline_s)
    return tmp


def _load(folder, engine):
    """Each reducer's per-rank results, and each rank's description of the engine's TP group."""
    out = {tag: [torch.load(os.path.join(folder, f"{tag}_rank{r}.pt")) for r in range(TP_SIZE)]
           for tag in (f"{engine}_tp", f"{engine}_coordinator")}
    out["groups"] = []
    for r in range(TP_SIZE):
        with open(os.path.join(folder, f"{engine}_group{r}.txt")) as f:
            out["groups"].append(f.read())
    return out


@pytest.fixture(scope="module")
def vllm_results():
    pytest.importorskip("vllm.distributed.parallel_state")
    import vllm.config  # noqa: F401  (imported once here, not in every child)

    with _run_workers(_vllm_worker) as folder:
        yield _load(folder, "vllm")


# ---- SGLang -------------------------------------------------------------------------------------------------


def _sglang_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.distributed.communication_op import tensor_model_parallel_all_reduce
    from sglang.srt.runtime_context import get_parallel

    ps.init_distributed_environment(TP_SIZE, rank, f"file://{init_file}", rank, backend="gloo", timeout=60)
    # SGLang's initialize_model_parallel always opens PyNccl for the TP group (on CPU: "ValueError: Expected a cuda
    # device, but got: cpu"); its own group factory without PyNccl / custom all-reduce builds the same TP
    # GroupCoordinator, published where get_tp_group() (and tensor_model_parallel_all_reduce) read it
    g = ps.init_model_parallel_group([list(range(TP_SIZE))], rank, "gloo", use_pynccl=False,
                                     use_custom_allreduce=False, group_name="tp")
    get_parallel().override_permanently(tp_group=g)
    try:
        assert ps.get_tp_group() is g
        group = _cpu_capable_group(g)
        with open(os.path.join(out_dir, f"sglang_group{rank}.txt"), "w") as f:
            f.write(f"{dist.get_backend(g.device_group)} {dist.get_backend(g.cpu_group)} {g.pynccl_comm}")
        _engine_scenarios(g.rank_in_group, g.world_size, group, tensor_model_parallel_all_reduce, out_dir,
                          "sglang_tp")
        _engine_scenarios(g.rank_in_group, g.world_size, group, g.all_reduce, out_dir, "sglang_coordinator")
    finally:
        # (not destroy_model_parallel: it imports sglang's launcher, which needs uvicorn)
        ps.destroy_distributed_environment()


@pytest.fixture(scope="module")
def sglang_results():
    pytest.importorskip("sglang.srt.distributed.parallel_state")
    with _run_workers(_sglang_worker) as folder:
        yield _load(folder, "sglang")


SCHEMES = ("column", "column_mixed", "column_fully_sharded", "row_caller", "row_caller_mixed", "row_h",
           "row_fully_sharded", "after_refusal")


def _check(outs, scheme):
    for r, out in enumerate(outs):
        assert (out["rank"], out["size"]) == (r, TP_SIZE)  # the engine's rank and size in its TP group
        c = out["res"][scheme]
        torch.testing.assert_close(c["got"], c["want"], rtol=1e-5, atol=1e-5, msg=f"{scheme} rank {r}")
        keep = c["keep"]
        assert keep.any() and torch.equal(c["after"][keep], c["before"][keep]), (scheme, r)  # bit-identical rows
        assert not torch.equal(c["after"][~keep], c["before"][~keep]), (scheme, r)  # and the others were written


def _check_group_and_refusal(results, engine):
    for desc in results["groups"]:
        assert desc.split()[:2] == ["gloo", "gloo"], desc  # backend="gloo": the engine's device group is gloo too
    for reducer in ("tp", "coordinator"):
        for r, out in enumerate(results[f"{engine}_{reducer}"]):
            msg = out["refusal"]
            assert msg.startswith(f"shard: expected a shard made for rank {r} of a group of {TP_SIZE}, got one for "
                                  f"rank {(r + 1) % TP_SIZE} of {TP_SIZE}") and "refused on every rank" in msg, msg


@pytest.mark.parametrize("reducer", ["tp", "coordinator"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_vllm_tp_group_sharded_equals_unsharded(scheme, reducer, vllm_results):
    _check(vllm_results[f"vllm_{reducer}"], scheme)


def test_vllm_tp_group_is_gloo_and_refuses_a_wrong_shard(vllm_results):
    _check_group_and_refusal(vllm_results, "vllm")


@pytest.mark.parametrize("reducer", ["tp", "coordinator"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_sglang_tp_group_sharded_equals_unsharded(scheme, reducer, sglang_results):
    _check(sglang_results[f"sglang_{reducer}"], scheme)


def test_sglang_tp_group_is_gloo_and_refuses_a_wrong_shard(sglang_results):
    _check_group_and_refusal(sglang_results, "sglang")
