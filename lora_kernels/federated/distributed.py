"""Federated aggregation across processes with torch.distributed (NCCL on GPUs, gloo on CPU).

Semantics:
    Every process of ``group`` holds some clients (``local_clients``, with their raw weights); process i's
    clients come before process i+1's. :func:`aggregate` returns, on every process, the aggregate of ALL
    clients, equal to the single-process :func:`~lora_kernels.federated.stack` / ``stack_svd`` / ``fedavg`` of
    the concatenated client list (bit-identical on the factor route; to rounding on the dense route).

Protocol (tensors only, no pickled objects):
    1. ``all_gather`` of a fixed 6-int64 header per process: status (0 = its inputs passed validation), number
       of local clients, number of layers, a CRC of the sorted (layer, in, out) list, fp64 flag. Any refusal
       or disagreement raises the same ValueError on every process before any factor is sent, so no process
       blocks in a collective the others skipped and nothing is aggregated half-way.
    2. ``all_gather`` of a float64 table per process padded to the largest client count: per client its weight,
       per-layer scales and ranks (ranks are exact in float64).
    3. One payload collective, chosen by bytes (``route="auto"``):

       - ``"factors"``: every process packs its clients' factors (each layer's ``A_k`` then ``B_k``, sorted
         layer names) into one flat buffer padded to the largest process's length; ``all_gather``; every
         process unpacks the clients of all processes (different ranks: the table says where each starts) and
         runs the single-process aggregator. Receives ``(P - 1) * max_len`` elements per process.
       - ``"dense"`` (stack / stack_svd): each process forms ``sum_{k local} p_k s_k B_k A_k`` per layer, one
         flat ``all_reduce`` (a ring moves about ``2 (P - 1) / P * sum(in * out)`` elements per process);
         ``stack`` then returns the exact factorisation ``(A, B) = (D, I_out)`` (or ``(I_in, D)`` when
         ``in < out``) of rank ``min(in, out)``, ``stack_svd`` the truncated dense SVD.
       - fedavg with ``report_error=False``: one ``all_reduce`` of the weighted, zero-padded factor sums. With
         ``report_error=True`` (the default) fedavg uses the factor route, because its error against the
         exact sum needs every client's factors.

       ``"auto"`` takes the dense route iff ``2 * sum(in * out) < P * max_len``, i.e. when the stacked rank of
       the group is about ``min(in, out)`` or more.

    Payloads travel in the compute dtype (fp64 if any process has an fp64 factor, else fp32), on the CUDA
    device for NCCL and on the CPU for other backends; results come back on the local clients' device.

Launch (see docs/federated.md)::

    torchrun --nproc_per_node 2 python/federated_round.py            # gloo on CPU
    torch.distributed.init_process_group("nccl")  # on GPUs; then aggregate(...) as above
"""

from __future__ import annotations

import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .._validation import check
from .adapters import ClientAdapter, LoRAFactors, check_client_weights, check_clients, client_weight_values
from .aggregate import Aggregate, _compute_dtype, fedavg, stack, stack_svd
from .lowrank import pad_rank, truncate

__all__ = ["aggregate", "choose_route"]

_METHODS = ("stack", "stack_svd", "fedavg")


def _comm_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _layers_signature(layers: List[Tuple[str, int, int]]) -> int:
    return zlib.crc32(repr(layers).encode()) & 0x7FFFFFFF


def choose_route(method: str, layer_dims: Sequence[Tuple[int, int]], world: int, max_len: int,
                 report_error: bool = True) -> str:
    """``"factors"`` or ``"dense"`` (see the module docstring); ``layer_dims`` are the (in, out) of every layer,
    ``max_len`` the largest process's packed factor length (elements)."""
    if method == "fedavg":
        return "factors" if report_error else "reduce_factors"
    dense = sum(i * o for i, o in layer_dims)
    return "dense" if 2 * dense < world * max_len else "factors"


def aggregate(local_clients: Sequence[ClientAdapter], method: str = "stack", *,
              weights: Optional[Sequence[float]] = None, target_rank: Optional[int] = None,
              group: Optional["dist.ProcessGroup"] = None, route: str = "auto",
              clients_per_process: Optional[Sequence[int]] = None, num_clients: Optional[int] = None,
              report_error: bool = True, svd_method: str = "auto",
              compute_dtype: Optional[torch.dtype] = None) -> Aggregate:
    """Aggregate the clients of every process of ``group``; call on every process with the same options.

    Args:
        local_clients: this process's client adapters (>= 1; see :mod:`~lora_kernels.federated.adapters`).
        method: ``"stack"``, ``"stack_svd"`` or ``"fedavg"``.
        weights: raw non-negative weights of the local clients (normalised over ALL clients); default 1 each.
        target_rank: the rank of ``stack_svd`` (required for it, refused otherwise).
        group: the process group (default: the world).
        route: ``"auto"``, ``"factors"`` or ``"dense"`` (stack / stack_svd only; fedavg chooses itself).
        clients_per_process: optional expected client count of every process; its length must equal the group
            size (a group of the wrong size is refused).
        num_clients: optional expected total number of clients (a group larger than it is refused).
        report_error: fedavg only: compute its error against the exact sum (needs the factor route).
        svd_method, compute_dtype: as :func:`~lora_kernels.federated.stack_svd`.
    Returns:
        The :class:`~lora_kernels.federated.Aggregate` of all clients, on every process.
    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError / TypeError: bad options, a wrong group size, or any process's invalid inputs (layer shapes
            that disagree, negative or all-zero weights, ``target_rank`` above the stacked rank): raised on
            every process, before any factor is exchanged.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("lora_kernels.federated.distributed.aggregate: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    # Checks whose outcome is the same on every process: raise before any collective.
    check(method in _METHODS, "method", f"one of {_METHODS}", repr(method))
    check(route in ("auto", "factors", "dense"), "route", "'auto', 'factors' or 'dense'", repr(route))
    check(method != "fedavg" or route == "auto", "route", "'auto' for fedavg", repr(route))
    check((target_rank is not None) == (method == "stack_svd"), "target_rank",
          "an int for method='stack_svd' and None otherwise", target_rank)
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    if clients_per_process is not None:
        check(len(clients_per_process) == world, "group", f"a process group of size len(clients_per_process)="
              f"{len(clients_per_process)}", f"size {world}")
    if num_clients is not None:
        check(world <= num_clients, "group", f"at most num_clients={num_clients} processes (one client or more "
              "each)", f"size {world}")
    dev = _comm_device(group)

    # 1. Local validation; the outcome is shared before anything else.
    local_err: Optional[BaseException] = None
    norm: List[Dict[str, LoRAFactors]] = []
    raw_w: List[float] = []
    layers: List[Tuple[str, int, int]] = []
    any64 = False
    try:
        norm = check_clients(local_clients, "local_clients")
        if weights is None:
            raw_w = [1.0] * len(norm)
        else:  # the single-process rules (types, finite, >= 0: any error here is a ValueError / TypeError, so
            # every process learns of it through the header instead of one process raising before the collective)
            exact = client_weight_values(weights, len(norm), "weights")
            raw_w = []
            for w in exact:
                try:
                    raw_w.append(float(w))
                except OverflowError:
                    raise ValueError(f"weights: expected values that float64 holds (they travel between processes "
                                     f"as float64), got one of about 10**{len(str(int(w))) - 1}") from None
        layers = sorted((n, f.A.shape[1], f.B.shape[0]) for n, f in norm[0].items())
        any64 = _compute_dtype(norm, compute_dtype) == torch.float64
    except (TypeError, ValueError) as e:
        local_err = e
    header = torch.tensor([0 if local_err is None else 1, len(norm), len(layers), _layers_signature(layers),
                           int(any64), 0], dtype=torch.int64, device=dev)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    H = torch.stack(headers).cpu().tolist()
    bad = [i for i, h in enumerate(H) if h[0] != 0]
    if bad:
        if local_err is not None:
            raise type(local_err)(f"{local_err} (process {me}; refused on every process)") from local_err
        raise ValueError(f"local_clients: expected valid inputs on every process, got invalid inputs on "
                         f"process(es) {bad} (see their error); nothing was aggregated")
    check(len({(h[2], h[3]) for h in H}) == 1, "local_clients", "the same layer names and (in, out) on every "
          "process", f"{[(h[2], h[3]) for h in H]} (layer count, CRC of the layer list) per process")
    counts = [h[1] for h in H]
    if clients_per_process is not None:
        check(counts == list(clients_per_process), "clients_per_process", f"the actual counts {counts}",
              list(clients_per_process))
    K = sum(counts)
    if num_clients is not None:
        check(K == num_clients, "num_clients", f"the total client count {K} over {world} processes", num_clients)
    dt = compute_dtype or (torch.float64 if any(h[4] for h in H) else torch.float32)
    L = len(layers)

    # 2. The client table: weight, scales, ranks of every client of every process.
    kmax = max(counts)
    row = 1 + 2 * L
    tab = torch.zeros(kmax, row, dtype=torch.float64)
    for k, c in enumerate(norm):
        tab[k, 0] = raw_w[k]
        for j, (n, _, _) in enumerate(layers):
            tab[k, 1 + j] = c[n].scale
            tab[k, 1 + L + j] = c[n].rank
    tabs = [torch.empty(kmax, row, dtype=torch.float64, device=dev) for _ in range(world)]
    dist.all_gather(tabs, tab.to(dev), group=group)
    table = torch.cat([t.cpu()[:n] for t, n in zip(tabs, counts)]).tolist()  # [K, row], process order
    gw = [t[0] for t in table]
    # (exact normalisation, as the single-process aggregators: weights of 1e308 each do not overflow the sum)
    p = check_client_weights(gw, K, "weights")
    ranks = [[int(t[1 + L + j]) for j in range(L)] for t in table]
    scales = [[t[1 + j] for j in range(L)] for t in table]
    if method == "stack_svd":
        check(isinstance(target_rank, int) and target_rank >= 1, "target_rank", "an int >= 1", target_rank)
        for j, (n, i_f, o_f) in enumerate(layers):
            R = sum(r[j] for r in ranks)
            check(target_rank <= min(R, i_f, o_f), "target_rank", f"<= min(stacked rank {R}, in {i_f}, out {o_f})"
                  f" of layer {n!r}", target_rank)

    # 3. The payload.
    def client_len(k: int) -> int:
        return sum(ranks[k][j] * (i_f + o_f) for j, (_, i_f, o_f) in enumerate(layers))

    starts = [sum(counts[:i]) for i in range(world)]
    max_len = max(sum(client_len(starts[i] + k) for k in range(counts[i])) for i in range(world))
    if route == "auto":
        route = choose_route(method, [(i, o) for _, i, o in layers], world, max_len, report_error)
    out_dev = next(iter(norm[0].values())).A.device
    me0 = starts[me]

    if route == "factors":
        buf = torch.zeros(max_len, dtype=dt, device=dev)
        pos = 0
        for c in norm:
            for n, _, _ in layers:
                for t in (c[n].A, c[n].B):
                    buf[pos : pos + t.numel()] = t.detach().to(dev, dt).reshape(-1)
                    pos += t.numel()
        bufs = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(bufs, buf, group=group)
        clients: List[Dict[str, LoRAFactors]] = []
        for i in range(world):
            b = bufs[i].to(out_dev)
            pos = 0
            for k in range(counts[i]):
                g = starts[i] + k
                c = {}
                for j, (n, i_f, o_f) in enumerate(layers):
                    r = ranks[g][j]
                    A = b[pos : pos + r * i_f].view(r, i_f)
                    pos += r * i_f
                    B = b[pos : pos + o_f * r].view(o_f, r)
                    pos += o_f * r
                    c[n] = LoRAFactors(A, B, scales[g][j])
                clients.append(c)
        if method == "stack":
            res = stack(clients, gw, compute_dtype=dt)
        elif method == "stack_svd":
            res = stack_svd(clients, target_rank, gw, method=svd_method, compute_dtype=dt)
        else:
            res = fedavg(clients, gw, compute_dtype=dt)
        res.notes.append(f"distributed: factor all_gather over {world} processes ({max_len} elements each)")
        return res

    if route == "reduce_factors":  # fedavg without its error: reduce the padded weighted factor sums
        r_max = [max(r[j] for r in ranks) for j in range(L)]
        sizes = [(r_max[j] * i_f, o_f * r_max[j]) for j, (_, i_f, o_f) in enumerate(layers)]
        buf = torch.zeros(sum(a + b for a, b in sizes), dtype=dt, device=dev)
        pos = 0
        for j, (n, i_f, o_f) in enumerate(layers):
            a_sum = buf[pos : pos + sizes[j][0]].view(r_max[j], i_f)
            b_sum = buf[pos + sizes[j][0] : pos + sizes[j][0] + sizes[j][1]].view(o_f, r_max[j])
            for k, c in enumerate(norm):
                A, B = pad_rank(c[n].A.detach().to(dev, dt), c[n].B.detach().to(dev, dt), r_max[j])
                a_sum.add_(A, alpha=p[me0 + k])
                b_sum.add_(B, alpha=p[me0 + k] * c[n].scale)
            pos += sizes[j][0] + sizes[j][1]
        dist.all_reduce(buf, group=group)
        buf = buf.to(out_dev)
        out: Dict[str, LoRAFactors] = {}
        pos = 0
        for j, (n, i_f, o_f) in enumerate(layers):
            A = buf[pos : pos + sizes[j][0]].view(r_max[j], i_f)
            B = buf[pos + sizes[j][0] : pos + sizes[j][0] + sizes[j][1]].view(o_f, r_max[j])
            out[n] = LoRAFactors(A, B, 1.0)
            pos += sizes[j][0] + sizes[j][1]
        return Aggregate({n: out[n] for n in norm[0]}, "fedavg", notes=[
            "inexact baseline: mean(B) mean(A) != mean(B A); error NOT measured (report_error=False)",
            f"distributed: all_reduce of padded factor sums over {world} processes"])

    # Dense route: all_reduce of the weighted dense deltas.
    buf = torch.zeros(sum(i_f * o_f for _, i_f, o_f in layers), dtype=dt, device=dev)
    pos = 0
    for n, i_f, o_f in layers:
        d = buf[pos : pos + o_f * i_f].view(o_f, i_f)
        for k, c in enumerate(norm):
            d.addmm_(c[n].B.detach().to(dev, dt), c[n].A.detach().to(dev, dt), alpha=p[me0 + k] * c[n].scale)
        pos += o_f * i_f
    dist.all_reduce(buf, group=group)
    buf = buf.to(out_dev)
    res_layers: Dict[str, LoRAFactors] = {}
    rel: Dict[str, float] = {}
    notes = [f"distributed: dense all_reduce over {world} processes ({buf.numel()} elements; factors would be "
             f"{world} x {max_len})"]
    pos = 0
    for n, i_f, o_f in layers:
        D = buf[pos : pos + o_f * i_f].view(o_f, i_f)
        pos += o_f * i_f
        if method == "stack":
            eye = torch.eye(min(i_f, o_f), dtype=dt, device=out_dev)
            res_layers[n] = LoRAFactors(D, eye, 1.0) if o_f <= i_f else LoRAFactors(eye, D, 1.0)
        else:
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
            A, B = truncate(U, S, Vh, target_rank)
            res_layers[n] = LoRAFactors(A, B, 1.0)
            s2 = S.double().square()
            tot = float(s2.sum().sqrt())
            rel[n] = float(s2[target_rank:].sum().sqrt()) / tot if tot > 0 else 0.0
    if method == "stack":
        notes.append("exact: dense sum D returned as (A, B) = (D, I) (or (I, D)) of rank min(in, out)")
    return Aggregate({n: res_layers[n] for n in norm[0]}, method, rel, notes)
