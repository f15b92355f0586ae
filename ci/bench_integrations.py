"""Speed of the integrations on a GPU against SDPA, same process: a training step and greedy generation of a small
Llama (random weights, bf16) with attn_implementation="fa2rt" vs "sdpa", and F.scaled_dot_product_attention under the
flash backend with fa2rt's registry implementation activated vs torch's own flash kernel.

    python ci/bench_integrations.py [--out docs/bench/integrations-h200.json]

Times are medians (triton.testing.do_bench for the training step and SDPA calls, wall clock over repeats for
generation). The record carries the device, driver-visible torch/Triton/transformers versions and the date.
"""

import argparse
import datetime
import json
import os
import statistics
import time

os.environ.setdefault("FA2RT_MIN_SEQLEN", "0")  # the kernels at any length: this measures them, not the policy

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fa2rt.integrations import sdpa as sdpa_integration  # noqa: E402
from fa2rt.integrations import transformers as tf_integration  # noqa: E402

MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=8192)
TRAIN_BATCH, TRAIN_SEQ = 4, 2048
GEN_BATCH, GEN_PROMPT, GEN_NEW, GEN_REPEATS = 8, 512, 128, 3
SDPA_SHAPES = [(4, 16, 4096, 128), (8, 16, 2048, 64)]  # (batch, nheads, seqlen, headdim), bf16, causal


def build():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**MODEL)).to("cuda", torch.bfloat16)


def train_step_ms(model, impl: str) -> float:
    model.set_attn_implementation(impl)
    ids = torch.randint(0, MODEL["vocab_size"], (TRAIN_BATCH, TRAIN_SEQ), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    return triton.testing.do_bench(step, warmup=3, rep=200)


def generation_tokens_per_s(model, impl: str) -> float:
    model.set_attn_implementation(impl)
    ids = torch.randint(0, MODEL["vocab_size"], (GEN_BATCH, GEN_PROMPT), device="cuda")
    kwargs = dict(max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kwargs)  # warm-up
        times = []
        for _ in range(GEN_REPEATS):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return GEN_BATCH * GEN_NEW / statistics.median(times)


def sdpa_fwd_bwd_ms(shape) -> float:
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def call():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), grad)

    return triton.testing.do_bench(call, warmup=5, rep=200)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the record here as JSON (printed either way)")
    args = parser.parse_args()
    tf_integration.register()
    sdpa_integration.register()
    model = build()
    record = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "date": datetime.date.today().isoformat(), "model": MODEL,
        "train_step_ms": {impl: train_step_ms(model, impl) for impl in ("sdpa", "fa2rt")},
        "generation_tokens_per_s": {impl: generation_tokens_per_s(model, impl) for impl in ("sdpa", "fa2rt")},
        "sdpa_registry_fwd_bwd_ms": {},
    }
    for shape in SDPA_SHAPES:
        torch_flash = sdpa_fwd_bwd_ms(shape)
        torch.nn.attention.activate_flash_attention_impl("fa2rt")
        try:
            ours = sdpa_fwd_bwd_ms(shape)
        finally:
            torch.nn.attention.restore_flash_attention_impl()
        record["sdpa_registry_fwd_bwd_ms"][str(shape)] = {"torch_flash": torch_flash, "fa2rt": ours}
    record["sdpa_registry_calls"] = {f"{op} {where}": n for (op, where), n in sdpa_integration.calls.items()}
    text = json.dumps(record, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
