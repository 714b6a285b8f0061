"""Adapters from this library to the frameworks batched-LoRA users come from.

* :mod:`.transformers`: patch a Hugging Face model (Llama-, Qwen2-, GPT-2-style) so its target linears become
  :class:`~lora_kernels.nn.LoRALinear` reading per-request adapter ids (``with lk.adapters(ids):``).
* :mod:`.peft`: a ``PeftModel`` with several loaded adapters -> batched serving, and export back to PEFT files.
* :mod:`.vllm`: a PunicaWrapper-like backend (vLLM's method names and metadata layout).
* :mod:`.vllm_plugin`: the vLLM plugin (entry point ``vllm.general_plugins``, ``LORA_KERNELS_VLLM=1``): a subclass of
  the installed vLLM 0.33's own ``PunicaWrapperBase`` on :mod:`.vllm`.
* :mod:`.sglang`: SGLang's LoRA backend interface (``run_lora_a_sgemm`` ... ``prepare_lora_batch``).
* :mod:`.graphs`: CUDA-graph capture of one decode step with the LoRABatch build inside the graph.

Importing this package imports none of transformers, peft, vLLM or SGLang (each submodule imports what it
needs when it is imported). See docs/integrations.md.
"""

from .ids import adapters, current_adapter_ids, set_adapter_ids

__all__ = ["adapters", "current_adapter_ids", "set_adapter_ids"]
