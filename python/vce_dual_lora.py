"""Visual instruction tuning in miniature: vision tower -> VCE -> projector -> language model with Dual-LoRA.

The pipeline of "Visual Cue Enhancement and Dual Low-Rank Adaptation" (arXiv 2411.12787), at toy sizes with
random weights and no network:

* a tiny CLIP vision tower (transformers ``CLIPVisionModel``, frozen), whose hidden states of four layers
  (-2, -4, -6, -8 here, the official -2, -8, -14, -20 scaled down; the anchor is the last, -8) feed
* :class:`lora_kernels.nn.VisualCueEnhancement` with its 2-layer GELU projector (trained), whose output tokens
  are prepended to the text embeddings of
* a tiny Llama (``LlamaForCausalLM`` from a local ``LlamaConfig``, frozen) whose ``q_proj`` and ``v_proj`` are
  :class:`lora_kernels.nn.DualLoRALinear` layers (trained): two adapters (two "tasks"), each sample of the batch
  served by its task's adapter in the same forward (one LoRABatch for all layers).

A few AdamW steps on a fixed batch: the next-token loss on the text (image positions are not scored) must go
down. Runs on the GPU when there is one, else on the CPU (reference paths).

    python python/vce_dual_lora.py [--steps 8] [--cpu]
"""

from __future__ import annotations

import argparse

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

import lora_kernels as lk
from lora_kernels.nn import DualLoRALinear, VisualCueEnhancement

VISION_LAYERS = (-2, -4, -6, -8)
N_TASKS, RANK, ALPHA = 2, 8, 16  # paper: r = 32, alpha = 64 on q_proj / v_proj


def build(device, hidden=64, vision_hidden=48, seed=0):
    torch.manual_seed(seed)
    vision = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=8, num_attention_heads=4,
        image_size=24, patch_size=4, num_channels=3)).to(device).eval().requires_grad_(False)  # 6 x 6 patches
    vce = VisualCueEnhancement(vision_hidden, n_levels=len(VISION_LAYERS), n_heads=4, n_points=4,
                               projector_dim=hidden, device=device)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128)).to(device).requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in lm.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "v_proj"):
            dl = DualLoRALinear(getattr(attn, name), max_adapters=N_TASKS, max_rank=RANK)
            for _ in range(N_TASKS):
                dl.new_adapter(RANK, alpha=ALPHA, generator=gen)
            setattr(attn, name, dl)
    return vision, vce, lm


def image_tokens(vision, vce, images):
    with torch.no_grad():
        hs = vision(pixel_values=images, output_hidden_states=True).hidden_states
    return vce(VisualCueEnhancement.select_features(hs, VISION_LAYERS))  # [B, 36, hidden]


def step_loss(vision, vce, lm, images, text, tasks):
    img = image_tokens(vision, vce, images)
    emb = torch.cat([img, lm.get_input_embeddings()(text)], 1)
    B, T = emb.shape[:2]
    labels = torch.cat([torch.full(img.shape[:2], -100, device=text.device), text], 1)
    # Every token of sample b (image and text) uses adapter tasks[b]; tokens are flattened sample-major.
    ids = tasks.to(torch.int32).repeat_interleave(T)
    batch = lk.LoRABatch.from_ids(ids, N_TASKS, ranks=lm.model.layers[0].self_attn.q_proj.w_dual.ranks)
    with lk.use_batch(batch):
        return lm(inputs_embeds=emb, labels=labels).loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    vision, vce, lm = build(device)
    g = torch.Generator().manual_seed(2)
    B = 4
    images = torch.randn(B, 3, 24, 24, generator=g).to(device)
    text = torch.randint(0, 96, (B, 12), generator=g).to(device)
    tasks = torch.arange(B) % N_TASKS
    params = [p for p in [*vce.parameters(), *lm.parameters()] if p.requires_grad]
    n_dual = sum(p.numel() for m in lm.modules() if isinstance(m, DualLoRALinear)
                 for p in m.parameters() if p.requires_grad)
    print(f"device {device}: trainable {sum(p.numel() for p in vce.parameters())} VCE+projector and {n_dual} "
          f"Dual-LoRA parameters ({N_TASKS} adapters, rank {RANK}); frozen vision tower and LM")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)  # no decay: "updated" means a gradient moved it
    # The VCE's discarded final norm (the official quirk) is the one trainable tensor with no gradient.
    watched = {n: p.detach().clone() for n, p in [*vce.named_parameters(), *lm.named_parameters()]
               if p.requires_grad and not n.startswith("norm.")}
    losses = []
    for step in range(args.steps):
        loss = step_loss(vision, vce, lm, images, text, tasks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        print(f"step {step}: loss {losses[-1]:.4f}")
    now = dict([*vce.named_parameters(), *lm.named_parameters()])
    frozen = [n for n, p in watched.items() if torch.equal(p, now[n].detach())]
    ok = len(losses) >= 2 and losses[-1] < losses[0] and not frozen
    print(("OK: " if ok else "FAIL: ") + f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; "
          f"{len(watched) - len(frozen)}/{len(watched)} trainable tensors updated"
          + (f" (not updated: {frozen})" if frozen else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
