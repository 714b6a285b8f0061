"""AdapterPool: many named LoRA adapters (PEFT files) served from the rank-paged LoRAWeights of every layer.

API (stable; integrations build on it)::

    pool = lk.AdapterPool(model_or_layers, *, max_adapters=None, capacity_rows=None, prefetch=True, pin=True)
    pool.register(name, path, *, config=None, pin=None)      # read + validate, host copy only (no slot)
    pool.load(name, path=None, *, config=None, pin=None) -> int   # (register +) make resident now; its slot id
    pool.load_many({name: path, ...}, *, resident=False, progress=True) -> None
    pool.prefetch(name) -> int        # resident asynchronously: pinned host copy -> device on a side stream
    ids = pool.acquire(names)         # list[int]; refcount +1 per name; stream waits only for these adapters
    pool.release(names)               # refcount -1 (the adapter becomes evictable when it reaches 0)
    with pool.use(names) as ids: ...  # acquire / release around a block
    pool.evict(name) -> bool          # drop the device copy (keeps the host copy); refuses a referenced one
    pool.unload(name)                 # evict + forget entirely
    pool.slot_of(name) -> int | None; pool.names; pool.resident; pool.stats (hits, misses, stalls, evictions)

Semantics:
    ``layers`` is a mapping ``{module path: LoRAWeights}`` (a tuple of paths as key for a fused group of
    slices, one path per slice, in slice order) or an ``nn.Module`` whose LoRA layers are
    :class:`~lora_kernels.nn.LoRALinear` modules (module path = the LoRALinear's name in the model, which is
    the path of the linear it replaced; a fused LoRALinear names its slices with a ``lora_slice_names``
    attribute: a tuple of module paths relative to its parent, e.g. ``("q_proj", "k_proj", "v_proj")``).
    Module paths are those of PEFT's keys ``base_model.model.<module path>.lora_A.weight``.

    An adapter is *registered* (validated, host copy, pinned for a pool on a CUDA device unless ``pin=False``)
    and, while it holds a slot, *resident*: it has the same slot id ``i`` in every layer, and ``adapter_ids ==
    i`` selects it in a :class:`~lora_kernels.LoRABatch`. A layer the adapter does not target holds rank 0 in
    slot ``i`` (no delta). A slot and its rows are reused only after the adapter is evicted, and an adapter whose
    reference count is above 0 is never evicted. When a slot or rows are short, the least recently used unreferenced
    resident adapter is evicted (LRU over ``acquire``/``load``/``prefetch`` times).

    On CUDA (with ``prefetch=True``, the default), device copies run on a side stream from pinned host memory;
    each adapter records an event after its copies, and ``acquire`` makes the current stream wait on the events
    of the adapters it names only (never a host sync). ``release`` records an event on the current stream; rows
    of an evicted adapter are rewritten only after the current stream waited on that event and the side stream
    on the current stream, so a batch still running on the GPU never reads rows of a newer adapter. With
    ``prefetch=False`` the copies are queued on the current stream instead. On the CPU they are synchronous.

    Every method is thread-safe (one lock around the pool's state, held only inside its methods: files are read
    outside it, and the model's kernels never run under it). Any method that raises leaves the pool unchanged,
    whatever the error (a refusal, or an exception such as an out-of-memory error half-way through): every
    layer's LoRAWeights is bit-identical (rows, offsets, ranks, scales, loaded slots, free rows) and so are the
    pool's names, slots, reference counts, LRU order, counters and host copies. Files are read and validated
    before anything changes; the changes themselves are made in one transaction (lora_kernels._transaction) that
    is rolled back on any exception.

Errors: :class:`AdapterFormatError` (ValueError; malformed or incompatible adapter files, including rank
above the layer's capacity), :class:`UnsupportedAdapterError` (a subclass: DoRA and other options this
library does not implement), :class:`AdapterInUseError` (evicting a referenced adapter),
:class:`PoolFullError` (no slot/rows free and every resident adapter referenced), KeyError (unknown name).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._transaction import Transaction, transaction
from ._validation import check_fits
from .peft_format import AdapterFormatError, HostAdapter, UnsupportedAdapterError, read_peft_adapter
from .weights import LoRAWeights, _coalesce

__all__ = ["AdapterPool", "PoolStats", "AdapterFormatError", "UnsupportedAdapterError", "AdapterInUseError",
           "PoolFullError"]

PathLike = Union[str, "os.PathLike[str]"]
Names = Union[Optional[str], Sequence[Optional[str]]]


class AdapterInUseError(RuntimeError):
    """The adapter is referenced (acquired and not yet released); it cannot be evicted now."""


class PoolFullError(RuntimeError):
    """No free slot/rows for an adapter and every resident adapter that could make room is referenced."""


@dataclass
class PoolStats:
    """Counters since construction (or :meth:`AdapterPool.reset_stats`).

    * ``hits``: names acquired that were resident with their copy complete.
    * ``misses``: names acquired that were not resident (made resident by ``acquire``).
    * ``stalls``: names acquired whose device copy had not finished yet (the stream waits on its event).
    * ``evictions``: adapters evicted (by LRU or :meth:`AdapterPool.evict`).
    * ``loads``: adapters made resident (their copies into the layers' storage issued).
    """

    hits: int = 0
    misses: int = 0
    stalls: int = 0
    evictions: int = 0
    loads: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses + self.stalls
        return self.hits / n if n else 0.0


@dataclass
class _Layer:
    paths: Tuple[str, ...]  # PEFT module path of each slice
    weights: LoRAWeights
    budget: int  # rows this pool may use in the layer


@dataclass
class _Part:
    """One adapter's factors for one layer, ready to copy: per slice A [r, in], B^T [r, out] (host, layer dtype)."""

    A: List[torch.Tensor]
    Bt: List[torch.Tensor]
    scales: List[float]
    nrows: int


class _Entry:
    __slots__ = ("name", "parts", "slot", "refs", "ready", "last_use")

    def __init__(self, name: str, parts: Dict[int, _Part]):
        self.name = name
        self.parts = parts
        self.slot: Optional[int] = None
        self.refs = 0
        self.ready = None  # torch.cuda.Event recorded after the device copies (None: complete)
        self.last_use = None  # torch.cuda.Event recorded at the last release


def _layers_of(layers) -> List[Tuple[Tuple[str, ...], LoRAWeights]]:
    if isinstance(layers, nn.Module):
        from .nn.lora_linear import LoRALinear

        out = []
        for path, mod in layers.named_modules():
            if not isinstance(mod, LoRALinear):
                continue
            w = mod.weights
            if w.num_slices == 1:
                out.append(((path,), w))
                continue
            rel = getattr(mod, "lora_slice_names", None)
            if rel is None or len(rel) != w.num_slices:
                raise ValueError(f"layers: expected the fused LoRALinear {path!r} ({w.num_slices} slices) to name its "
                                 f"slices in lora_slice_names, got {rel!r}")
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            out.append((tuple(f"{parent}.{r}" if parent else r for r in rel), w))
        if not out:
            raise ValueError(f"layers: expected a model with LoRALinear modules, got {type(layers).__name__} with none")
        return out
    if isinstance(layers, Mapping):
        out = []
        for key, w in layers.items():
            paths = (key,) if isinstance(key, str) else tuple(key)
            if not isinstance(w, LoRAWeights):
                raise TypeError(f"layers[{key!r}]: expected a LoRAWeights, got {type(w).__name__}")
            if not paths or not all(isinstance(p, str) for p in paths) or len(paths) != w.num_slices:
                raise ValueError(f"layers: expected key {key!r} to be one module path per slice "
                                 f"({w.num_slices}), got {len(paths)}")
            out.append((paths, w))
        if not out:
            raise ValueError("layers: expected at least one layer, got an empty mapping")
        return out
    raise TypeError(f"layers: expected a Mapping[str, LoRAWeights] or an nn.Module, got {type(layers).__name__}")


class AdapterPool:
    """Named LoRA adapters kept in the :class:`~lora_kernels.LoRAWeights` of many layers (module docstring).

    Args:
        layers: ``{module path (or tuple of paths per slice): LoRAWeights}`` or a model with LoRALinear modules.
            The pool owns the slots of these weights: do not ``add``/``remove`` on them directly while it
            lives (slots already loaded when the pool is built are left alone and never used).
        max_adapters: most adapters resident at once (default and upper bound: the layers' ``max_adapters``).
        capacity_rows: rows the pool may use per layer (default and upper bound: each layer's
            ``capacity_rows``).
        prefetch: on CUDA, copy on a side stream with events (True) or on the current stream (False).
        pin: default for :meth:`register`'s ``pin``: keep pinned host copies (CUDA only).

    Raises:
        TypeError / ValueError naming the argument (layers on several devices, slots or paths that disagree).
    """

    def __init__(
        self,
        layers: Union[Mapping[Union[str, Tuple[str, ...]], LoRAWeights], nn.Module],
        *,
        max_adapters: Optional[int] = None,
        capacity_rows: Optional[int] = None,
        prefetch: bool = True,
        pin: bool = True,
    ):
        found = _layers_of(layers)
        devs = {w.device for _, w in found}
        if len(devs) != 1:
            raise ValueError(f"layers: expected LoRAWeights on one device, got {sorted(map(str, devs))}")
        n_slots = min(w.max_adapters for _, w in found)
        if max_adapters is not None and (not isinstance(max_adapters, int) or isinstance(max_adapters, bool)
                                         or not 1 <= max_adapters <= n_slots):
            raise ValueError(f"max_adapters: expected an int in [1, {n_slots}] (the layers' slots), "
                             f"got {max_adapters!r}")
        if capacity_rows is not None and (not isinstance(capacity_rows, int) or isinstance(capacity_rows, bool)
                                          or capacity_rows < 1):
            raise ValueError(f"capacity_rows: expected an int >= 1, got {capacity_rows!r}")
        self._layers: List[_Layer] = []
        self._index: Dict[str, Tuple[int, int]] = {}  # module path -> (layer, slice)
        for paths, w in found:
            for s, p in enumerate(paths):
                if p in self._index:
                    raise ValueError(f"layers: expected each module path once, got {p!r} twice")
                self._index[p] = (len(self._layers), s)
            budget = w.capacity_rows if capacity_rows is None else min(capacity_rows, w.capacity_rows)
            self._layers.append(_Layer(paths, w, budget))
        self.device = devs.pop()
        taken = set().union(*(w.loaded for _, w in found))
        self._free_slots = [i for i in range(n_slots) if i not in taken][: max_adapters or n_slots]
        self.max_adapters = len(self._free_slots)
        #: Slot ids are < num_slots: size a LoRABatch with ``max_adapters=pool.num_slots``.
        self.num_slots = n_slots
        self._used_rows = [0] * len(self._layers)
        self._entries: Dict[str, _Entry] = {}
        self._lru: "OrderedDict[str, None]" = OrderedDict()  # resident names, least recently used first
        self._lock = threading.RLock()
        self._stats = PoolStats()
        self._cuda = self.device.type == "cuda"
        self._prefetch = bool(prefetch)
        self._pin = bool(pin)
        self._side = None  # side stream, created on first use
        self._txn_local = threading.local()  # the transaction of the call in progress (nested calls join it)

    # ---- introspection -------------------------------------------------------------------------------
    @property
    def layers(self) -> List[Tuple[Tuple[str, ...], LoRAWeights]]:
        """``(module paths per slice, LoRAWeights)`` of every layer, in order."""
        return [(lay.paths, lay.weights) for lay in self._layers]

    @property
    def names(self) -> List[str]:
        """Registered adapter names (resident or not), in registration order."""
        with self._lock:
            return list(self._entries)

    @property
    def resident(self) -> Dict[str, int]:
        """``{name: slot}`` of resident adapters, least recently used first."""
        with self._lock:
            return {n: self._entries[n].slot for n in self._lru}

    @property
    def stats(self) -> PoolStats:
        """A snapshot of the counters (see :class:`PoolStats`)."""
        with self._lock:
            return PoolStats(**vars(self._stats))

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = PoolStats()

    def slot_of(self, name: str) -> Optional[int]:
        """The slot id of a resident adapter, None when it is registered but not resident (KeyError if unknown)."""
        with self._lock:
            return self._entry(name).slot

    def refcount(self, name: str) -> int:
        with self._lock:
            return self._entry(name).refs

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __repr__(self) -> str:
        with self._lock:
            return (f"AdapterPool(layers={len(self._layers)}, registered={len(self._entries)}, "
                    f"resident={len(self._lru)}/{self.max_adapters}, device={self.device}, stats={self._stats})")

    # ---- registering ---------------------------------------------------------------------------------
    def register(
        self,
        name: str,
        source: PathLike,
        *,
        config=None,
        pin: Optional[bool] = None,
        adapter_name: Optional[str] = None,
    ) -> None:
        """Read and validate an adapter (see :func:`~lora_kernels.peft_format.read_peft_adapter`) and keep a host
        copy in each layer's dtype (pinned for a pool on a CUDA device when ``pin``, default the pool's ``pin``); it
        takes no slot until used.

        Raises:
            TypeError: ``name`` is not a non-empty str, or ``source`` not a str / os.PathLike.
            AdapterFormatError / UnsupportedAdapterError: the file is malformed, unsupported or does not fit
                these layers (unknown module, wrong shape, rank above a layer's ``max_rank`` or row budget).
            ValueError: ``name`` already registered (``unload`` it first). The pool is unchanged on any error.
        """
        entry = self._read_new(name, source, config, pin, adapter_name)
        with self._lock:
            self._check_new_name(name)  # registered by another thread meanwhile
            self._entries[name] = entry

    def _check_new_name(self, name) -> None:
        if name in self._entries:
            raise ValueError(f"name: expected a new adapter name, got {name!r} (already registered; unload() it)")

    def _read_new(self, name, source, config, pin, adapter_name) -> "_Entry":
        """Validate the arguments of a registration and read the file (outside the lock: files are slow); the
        pool is not changed."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"name: expected a non-empty str, got {name!r}")
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source: expected a str or os.PathLike (a PEFT directory or .safetensors file), got "
                            f"{type(source).__name__}")
        with self._lock:
            self._check_new_name(name)
        return self._read(name, source, config, self._pin if pin is None else bool(pin), adapter_name)

    def _read(self, name, source, config, pin, adapter_name) -> _Entry:
        # (in, out, max_rank): a rank above a layer's capacity is refused from the safetensors header, before any
        # tensor is read or allocated.
        expected = {p: (self._layers[li].weights.in_features, self._layers[li].weights.slice_outs[s],
                        self._layers[li].weights.max_rank)
                    for p, (li, s) in self._index.items()}
        host = read_peft_adapter(source, name=name, config=config, expected=expected, adapter_name=adapter_name)
        return self._prepare(host, pin)

    def _prepare(self, host: HostAdapter, pin: bool) -> _Entry:
        by_layer: Dict[int, Dict[int, Tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for p, fac in host.modules.items():
            li, s = self._index[p]
            by_layer.setdefault(li, {})[s] = fac
        parts: Dict[int, _Part] = {}
        pin = pin and self._cuda and torch.cuda.is_available()
        for li, facs in sorted(by_layer.items()):
            lay = self._layers[li]
            w = lay.weights
            As, Bts, scales = [], [], []
            for s in range(w.num_slices):
                if s in facs:
                    A, B, sc = facs[s]
                    path = lay.paths[s]
                    if A.shape[0] > w.max_rank:
                        raise AdapterFormatError(f"{host.source}: module {path!r}: expected rank <= {w.max_rank} (the "
                                                 f"layer's max_rank), got {A.shape[0]}")
                    try:  # the scale is stored in fp32: refuse (here, at registration) one that overflows it
                        sc = check_fits("scale", float(sc), torch.float32)
                    except (TypeError, ValueError, OverflowError) as e:
                        rs = "sqrt(r) (rsLoRA)" if getattr(host.config, "use_rslora", False) else "r"
                        raise AdapterFormatError(f"{host.source}: module {path!r}: lora_alpha / alpha_pattern: "
                                                 f"expected the scale alpha / {rs} to be a finite fp32 value "
                                                 f"(|scale| <= 3.4028235e38), got {sc!r:.40}") from e
                    A, Bt = A.to(w.dtype).contiguous(), B.to(w.dtype).t().contiguous()
                    for what, t in (("lora_A", A), ("lora_B", Bt)):
                        if not bool(torch.isfinite(t).all()):
                            raise AdapterFormatError(f"{host.source}: module {path!r}: {what}.weight: expected "
                                                     f"values finite in {w.dtype}, got NaN/Inf after conversion")
                else:
                    # A fused group where this adapter has no LoRA on slice s: one zero row with scale 0 is an
                    # exact zero delta (LoRAWeights needs rank >= 1 in every slice of a stored adapter).
                    A = torch.zeros(1, w.in_features, dtype=w.dtype)
                    Bt = torch.zeros(1, w.slice_outs[s], dtype=w.dtype)
                    sc = 0.0
                As.append(A.pin_memory() if pin else A)
                Bts.append(Bt.pin_memory() if pin else Bt)
                scales.append(float(sc))
            nrows = max(a.shape[0] for a in As)
            if nrows > lay.budget:
                raise AdapterFormatError(f"{host.source}: layer {lay.paths[0]!r}: expected at most {lay.budget} rows "
                                         f"(the pool's capacity_rows for this layer), got rank {nrows}")
            parts[li] = _Part(As, Bts, scales, nrows)
        return _Entry(host.name, parts)

    def load(
        self,
        name: str,
        source: Optional[PathLike] = None,
        *,
        config=None,
        pin: Optional[bool] = None,
        adapter_name: Optional[str] = None,
    ) -> int:
        """Register ``name`` from ``source`` (skipped when ``source`` is None: the name must be registered) and make
        it resident now, evicting LRU adapters as needed; returns its slot id. On CUDA the copies are queued before
        anything queued next on the current stream (no host sync); on the CPU they are done on return.

        The id stays valid until the adapter is evicted; batches in flight must :meth:`acquire` what they use.

        Raises:
            as :meth:`register`; KeyError (``source`` None and ``name`` unknown); PoolFullError when no room can
            be made. The pool is unchanged on any error (no registration, no eviction).
        """
        entry = None
        if source is not None:
            entry = self._read_new(name, source, config, pin, adapter_name)
        with self._lock, self._transaction() as txn:
            if entry is not None:
                self._check_new_name(name)
                self._entries[name] = entry
            e = self._entry(name)
            if e.slot is not None:
                self._lru.move_to_end(name)
                return e.slot
            return self._make_resident(e, asynchronous=False, txn=txn)

    def load_many(
        self,
        sources: Union[Mapping[str, PathLike], Iterable[Tuple[str, PathLike]]],
        *,
        config=None,
        resident: bool = False,
        progress: bool = True,
    ) -> None:
        """Register many adapters (a tqdm progress bar when ``progress`` and tqdm is installed); with
        ``resident`` also prefetch them, in order, while slots last (never evicting one of them for another).

        Every file is read and validated first; then all are registered (and made resident) in one step.

        Raises: as :meth:`register` (also for a name given twice); the pool is unchanged on any error.
        """
        if isinstance(sources, (str, bytes)):
            raise TypeError(f"sources: expected a mapping or (name, source) pairs, got {type(sources).__name__}")
        items = list(sources.items() if isinstance(sources, Mapping) else sources)
        seen = set()
        for i, it in enumerate(items):
            if not isinstance(it, (tuple, list)) or len(it) != 2:
                raise TypeError(f"sources[{i}]: expected a (name, source) pair, got {it!r:.80}")
            if isinstance(it[0], str):
                if it[0] in seen:
                    raise ValueError(f"sources[{i}]: expected each adapter name once, got {it[0]!r} again")
                seen.add(it[0])
        bar = items
        if progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(items, desc="adapters", unit="adapter")
            except ImportError:
                pass
        try:
            read = [(name, self._read_new(name, src, config, None, None)) for name, src in bar]
        finally:
            if bar is not items:
                bar.close()
        with self._lock, self._transaction() as txn:
            for name, entry in read:
                self._check_new_name(name)
                self._entries[name] = entry
            if resident:
                done = {name for name, _ in read}
                for name, _ in read[: self.max_adapters]:
                    e = self._entries[name]
                    if e.slot is None:
                        if self._plan(e, done) is None:
                            break
                        self._make_resident(e, asynchronous=True, protect=done, txn=txn)

    # ---- residency -----------------------------------------------------------------------------------
    def prefetch(self, name: str) -> int:
        """Make ``name`` resident, copying asynchronously on CUDA (side stream, event recorded); returns its slot.
        A resident adapter is only marked recently used. Raises KeyError, PoolFullError (pool unchanged)."""
        with self._lock, self._transaction() as txn:
            e = self._entry(name)
            if e.slot is not None:
                self._lru.move_to_end(name)
                return e.slot
            return self._make_resident(e, asynchronous=True, txn=txn)

    def acquire(self, names: Names) -> List[int]:
        """Reference adapters for a batch and return their slot ids (``None`` -> ``-1``), in the order given.

        Each occurrence of a name adds one reference (release the same list). Names not resident are made
        resident (misses); on CUDA the current stream then waits on the copy events of exactly these adapters
        (``stalls`` counts those not finished yet); no host sync.

        Raises:
            TypeError (a name that is not a str or None), KeyError (unknown name), PoolFullError (the names do not
            fit at once): the pool is unchanged then (no reference taken, no adapter made resident or evicted,
            counters as they were).
        """
        lst = [names] if names is None or isinstance(names, str) else list(names)
        with self._lock:
            for n in lst:
                if n is not None:
                    self._entry(n)
            ids: List[int] = []
            seen = set()
            with self._transaction() as txn:
                for n in lst:
                    if n is None:
                        ids.append(-1)
                        continue
                    e = self._entries[n]
                    if e.slot is None:
                        self._stats.misses += 1
                        self._make_resident(e, asynchronous=True, txn=txn)
                    elif n not in seen:
                        if e.ready is not None and not e.ready.query():
                            self._stats.stalls += 1
                        else:
                            self._stats.hits += 1
                    e.refs += 1
                    seen.add(n)
                    self._lru.move_to_end(n)
                    ids.append(e.slot)
            if self._cuda:
                stream = torch.cuda.current_stream(self.device)
                for n in seen:
                    e = self._entries[n]
                    if e.ready is not None:
                        stream.wait_event(e.ready)
                        if e.ready.query():
                            e.ready = None
            return ids

    def release(self, names: Names) -> None:
        """Drop one reference per occurrence (``None`` entries are skipped). On CUDA an event on the current
        stream marks the last use: the adapter's rows are rewritten only after it.

        Raises KeyError (unknown name) or ValueError (more releases than acquires); nothing changes then.
        """
        lst = [names] if names is None or isinstance(names, str) else list(names)
        with self._lock:
            count: Dict[str, int] = {}
            for n in lst:
                if n is not None:
                    self._entry(n)
                    count[n] = count.get(n, 0) + 1
            for n, c in count.items():
                if self._entries[n].refs < c:
                    raise ValueError(f"names: expected at most {self._entries[n].refs} releases of {n!r} (its "
                                     f"reference count), got {c}")
            ev = None
            if self._cuda and count:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
            with self._transaction():
                for n, c in count.items():
                    e = self._entries[n]
                    e.refs -= c
                    if ev is not None:
                        e.last_use = ev

    @contextlib.contextmanager
    def use(self, names: Names) -> Iterator[List[int]]:
        """``with pool.use(names) as ids:`` acquire before the block, release after it (also on error)."""
        # A one-shot iterable (a generator) would be consumed by acquire and release nothing: keep the list.
        lst = names if names is None or isinstance(names, str) else list(names)
        ids = self.acquire(lst)
        try:
            yield ids
        finally:
            self.release(lst)

    def evict(self, name: str) -> bool:
        """Drop the device copy of ``name`` (the host copy stays). Returns False when it was not resident.
        Raises KeyError, AdapterInUseError (referenced; nothing changes)."""
        with self._lock:
            e = self._entry(name)
            if e.slot is None:
                return False
            if e.refs:
                raise AdapterInUseError(f"name: expected an unreferenced adapter, got {name!r} with {e.refs} "
                                        "reference(s) (release() it first)")
            with self._transaction() as txn:
                self._evict(e, txn)
            return True

    def unload(self, name: str) -> None:
        """Evict ``name`` and forget it. Raises KeyError, AdapterInUseError (nothing changes)."""
        with self._lock, self._transaction():
            self.evict(name)
            del self._entries[name]

    # ---- internals (called with the lock held) -----------------------------------------------------------
    def _entry(self, name) -> _Entry:
        if not isinstance(name, str):
            raise TypeError(f"name: expected an adapter name (str, or None for no adapter), got {type(name).__name__}")
        e = self._entries.get(name)
        if e is None:
            raise KeyError(f"name: expected a registered adapter, got {name!r}")
        return e

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Transaction]:
        """One all-or-nothing change of the pool and its layers (call with the lock held; nests: an inner one
        joins the outer)."""
        outer = getattr(self._txn_local, "txn", None)
        with transaction(outer) as txn:
            if outer is not None:
                yield txn
                return
            txn.track(self)
            self._txn_local.txn = txn
            try:
                yield txn
            finally:
                self._txn_local.txn = None

    def _host_state(self):
        # Every field a pool method changes; entries keep their identity (and their host copies, never written).
        return (list(self._free_slots), list(self._used_rows), list(self._lru), dict(self._entries),
                {n: (e.slot, e.refs, e.ready, e.last_use) for n, e in self._entries.items()}, vars(self._stats).copy())

    def _restore_host_state(self, state) -> None:
        free_slots, used_rows, lru, entries, fields, stats = state
        self._free_slots[:] = free_slots
        self._used_rows[:] = used_rows
        self._lru.clear()
        self._lru.update((n, None) for n in lru)
        self._entries.clear()
        self._entries.update(entries)
        for n, (slot, refs, ready, last_use) in fields.items():
            e = entries[n]
            e.slot, e.refs, e.ready, e.last_use = slot, refs, ready, last_use
        self._stats = PoolStats(**stats)

    def _fits(self, li: int, nrows: int, free: List[Tuple[int, int]], used: int) -> bool:
        return used + nrows <= self._layers[li].budget and any(n >= nrows for _, n in free)

    def _plan(self, e: _Entry, protect=()) -> Optional[List[_Entry]]:
        """The LRU victims to evict so that ``e`` fits (a slot and rows in every layer it targets), or None when
        even evicting every unreferenced resident adapter would not do. Reads host state only; changes nothing."""
        free = {li: self._layers[li].weights.free_ranges for li in e.parts}
        used = {li: self._used_rows[li] for li in e.parts}
        slots = len(self._free_slots)
        victims: List[_Entry] = []

        def ok():
            return slots > 0 and all(self._fits(li, p.nrows, free[li], used[li]) for li, p in e.parts.items())

        candidates = (self._entries[n] for n in self._lru)
        while not ok():
            v = next((c for c in candidates if c.refs == 0 and c is not e and c.name not in protect), None)
            if v is None:
                return None
            victims.append(v)
            slots += 1
            for li in e.parts:
                if li in v.parts:
                    free[li] = _coalesce(free[li] + [self._layers[li].weights.rows_of(v.slot)])
                    used[li] -= v.parts[li].nrows
        return victims

    def _make_resident(self, e: _Entry, asynchronous: bool, protect=(), *, txn: Transaction) -> int:
        """Evict the planned victims and copy ``e`` into a free slot of every layer it targets, all inside ``txn``
        (rolled back together by the caller's transaction on any exception)."""
        victims = self._plan(e, protect)
        if victims is None:
            need = {self._layers[li].paths[0]: p.nrows for li, p in e.parts.items()}
            raise PoolFullError(f"{e.name!r}: expected a free slot and rows {need} after evicting unreferenced "
                                f"adapters, but {sum(x.refs > 0 for x in self._entries.values())} resident adapters "
                                "are referenced (release some or raise max_adapters/capacity_rows)")
        for v in victims:
            self._evict(v, txn)
        slot = self._free_slots.pop(0)
        use_side = self._cuda and self._prefetch
        ctx = torch.cuda.stream(self._side_stream()) if use_side else contextlib.nullcontext()
        with ctx:
            for li, p in e.parts.items():
                w = self._layers[li].weights
                plan = w._plan_add(p.A if w.num_slices > 1 else p.A[0],
                                   [bt.t() for bt in p.Bt] if w.num_slices > 1 else p.Bt[0].t(),
                                   scale=p.scales, adapter_id=slot, non_blocking=self._cuda,  # stream-ordered
                                   check_finite=False)  # checked in _prepare, on the host copies
                w._write_add(plan, txn)
                self._used_rows[li] += p.nrows
            if use_side:
                e.ready = torch.cuda.Event()
                e.ready.record(self._side)
                if not asynchronous:  # load(): resident for everything queued next on the current stream
                    torch.cuda.current_stream(self.device).wait_event(e.ready)
        e.slot = slot
        self._lru[e.name] = None
        self._lru.move_to_end(e.name)
        self._stats.loads += 1
        return slot

    def _evict(self, e: _Entry, txn: Transaction) -> None:
        slot = e.slot
        ctx = contextlib.nullcontext()
        if self._cuda:
            # Rows and metadata of this slot are rewritten on the copy stream (the side stream, or the current
            # one without prefetch), in order, after every batch queued so far on the current stream (and the
            # adapter's last release, maybe on another stream) is done with them.
            cur = torch.cuda.current_stream(self.device)
            if e.last_use is not None:
                cur.wait_event(e.last_use)
            if self._prefetch:
                side = self._side_stream()
                side.wait_stream(cur)
                ctx = torch.cuda.stream(side)
        with ctx:
            for li, p in e.parts.items():
                w = self._layers[li].weights
                w._write_remove(w._plan_remove(slot), txn)
                self._used_rows[li] -= p.nrows
        e.slot = None
        e.ready = None
        e.last_use = None
        del self._lru[e.name]
        self._free_slots.append(slot)
        self._free_slots.sort()
        self._stats.evictions += 1

    def _side_stream(self):
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side
