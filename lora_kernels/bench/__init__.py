"""Benchmark and tuning harness behind ``lora-bench`` (see docs/benchmarks.md).

Modules:
    cases      the named benchmark cases (BENCHMARKS.md's "Batched LoRA delta" table, plus CPU smoke cases),
               adapter-popularity distributions and the deterministic problem builder;
    baselines  the two PyTorch baselines every library timing is compared with (naive per-adapter loop,
               per-token gather + bmm padded to the largest rank);
    measure    timing (CUDA-graph replay with an L2 flush on a GPU, wall clock on the CPU), quantiles, the
               correctness rule and the roofline;
    envinfo    GPU, driver, versions and git commit for the JSON records;
    sgmv, tune, demo   the ``lora-bench`` subcommands.

Nothing here initialises CUDA at import.
"""

__all__ = ["baselines", "cases", "measure", "envinfo"]
