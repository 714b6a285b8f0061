"""Merge LoRA adapters into base weights in place, and undo it bit-exactly (V-LoRA's merged / mixed modes).

Semantics (W [out, in] the base Linear's weight, ``out = weights.out_features``; slice s of a fused projection
owns rows ``[col_s, col_s + out_s)``):

    merge_:   W[rows_s] <- rnd( W[rows_s] + delta_s ),
              delta_s = sum_j coef_{s,j} * B_{s,j} @ A_{s,j},   coef_{s,j} = fl32(fl32(lambda_j) * scale_{s,j})
    unmerge_: W <- the W before the merge, bit for bit (``exact=True``), or rnd(W - delta) (``exact=False``)

The delta is formed in fp32 (fp32 products and sums over the ranks, a fixed order per backend) and rounded
once into W; each weight is read once and written once. With ``exact=True`` the merge also returns, in the
same pass, a 2-bit code per weight (packed 4 per byte: ``ceil(numel / 4)`` bytes) plus a sparse list of
*escapes* (flat index int64 + original value) for the rare weights the code cannot restore; see
docs/merge.md for the maths. ``exact=False`` keeps no side data: unmerge is ``rnd(W' - delta)``, which leaves
a fraction of the weights one rounding step off (PEFT's behaviour, drifting over cycles).

Backends (:mod:`lora_kernels.backends`): the reference on CPU tensors; Triton on CUDA tensors (the compiled
CUDA kernel only where ``lora_kernels.tuning.verified_kernels(device)`` lists ``"merge_cuda"``, or when
forced with ``LORA_KERNELS_BACKEND=cuda``). Each backend computes the same delta in its merge and its unmerge
(so the restore is exact within it); deltas of different backends may differ in the last bits, so the record
remembers its backend and unmerge always uses that one.

Host syncs: an exact merge reads the escape counters back (one sync per call, after the launch); the first
merge of a plan also reads the adapters' scales to the host; unmerge does not sync. The host plan (validation,
terms, device descriptor tables) is cached across calls (:mod:`.tables`, alias
``lora_kernels.ops.merge_plan``: key and invalidation there), and the unmerge of a merge_many_'s records reuses
it. Neither op is CUDA-graph capturable (merge: the sync; an exact one also re-points a copy of its job table at
its code buffer per call).

Adapter weights with NaN/Inf (or a delta that overflows): the merged weights are what IEEE arithmetic gives
(NaN/Inf); every such weight is an escape (its original value is kept), so exact unmerge still restores W
bit for bit. ``merge_`` warns (RuntimeWarning) when it made finite weights non-finite.

Input contract (issue 13; docs/input-contract.md):

* Arguments are validated and converted before anything is written: adapter ids are integers of any integer
  type (Python, numpy, 0-dim or 1-D integer tensors; never bool, never a float such as ``1.0``), in
  ``[0, weights.max_adapters)`` and loaded (an id listed twice is two terms of the sum, each with its lambda);
  lambdas are finite real numbers (never bool, str or complex) whose fp32 coefficient
  ``fl32(fl32(lambda) * scale)`` is finite for every slice; ``exact`` is a bool.
* Outputs never overlap library-owned storage: a W may not share memory with any tensor of the layers'
  LoRAWeights (``a``, ``b``, ``offsets``, ``ranks``, ``scales``, ``slice_info``), with another W of the call, or
  with what a live (not yet unmerged) MergeRecord will read or write at its unmerge (its weights' storage, its
  side data); the adapter storage of a call may not overlap the W of a live record either. ValueError naming
  ``W`` / ``Ws[i]`` (or ``weights[i].a`` ...).
* Transactional: a refusal, or an exception at any later step (a launch, the escape pass, building the records,
  the non-finite warning turned into an error by a warnings filter), leaves every W bit-identical, W's version
  counter as it was, every record and the plan cache as they were. How: every check runs before the first
  write; after it, a failure is rolled back. An exact merge restores the layers written so far from the side
  data its own pass produced (the unmerge path, bit-exact for the same reason the unmerge is); the reference
  backend computes that side data for approximate merges too (host-only, it is discarded on success); an
  approximate Triton/CUDA merge has one launch as its last write (by construction nothing that can fail comes
  after it), or, when the layers span several dtype groups (several launches), keeps a copy of the layers of all
  launches but the last until they are done. An unmerge rolls back by merging the restored layers again
  (deterministic: the same kernel gives the same W' bit for bit), and approximate reference unmerges keep the
  codes of the inverse step. A launch that raises is assumed to have written nothing (launch-time failures: a
  compile error, an invalid argument). If the rollback itself fails, a note on the exception says so.

Layout: one job a module; in the order a call meets them (each op's route, public function -> kernel, runs
through these four files and the kernel's):

    api.py       merge_ / unmerge_ / merge_many_ / unmerge_many_, and the transaction around them: the checks,
                 the records, the op, the rollback of everything but the op's own partial pass
    checks.py    everything decided before the first write: the adapter ids and lambdas canonicalised, the
                 validation and host plan of a call (terms, fp32 coefficients), MergeRecord and the checks that a
                 record belongs to its W, the memory-overlap rules and the live (not yet unmerged) records
    dispatch.py  the four ``torch.ops.lora_kernels.*`` ops with their fakes, and what they run: backend choice,
                 the ops' bodies (side-data buffers, launches, escapes, rollback of a partial pass), the
                 reference backend's merge and unmerge (CPU), codes and escapes
    tables.py    the job table (column constants ``J_*`` / ``JOB_COLS`` and its builders; the Triton kernel
                 imports the columns from here, csrc/kernels/merge.cuh mirrors them) and the LRU cache of plans
                 (``lora_kernels.ops.merge_plan`` is an alias of this module)

The kernels: ``lora_kernels/triton/merge.py`` and ``csrc/kernels/merge.cuh`` (launcher ``csrc/merge.cu``). The
import path ``lora_kernels.ops.merge`` stays what the single module ``ops/merge.py`` was for the public API; the
private helpers live in the module that defines them, and the modules call each other's functions through the
module (``dispatch._run(...)``, never a from-import), so that a test patching
``lora_kernels.ops.merge.dispatch._run`` reaches every caller (tests inject failures at every step this way).
"""

from __future__ import annotations

from .api import merge_, merge_many_, unmerge_, unmerge_many_
from .checks import MergeRecord
from .dispatch import _cuda_ops  # noqa: F401  (a read: bench/sanitize_ops.py asks whether the CUDA kernel is built)
from .tables import build_tables  # noqa: F401  (the job table's reference builder; csrc names it here)

__all__ = ["MergeRecord", "merge_", "unmerge_", "merge_many_", "unmerge_many_"]
