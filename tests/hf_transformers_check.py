#!/usr/bin/env python3
"""hf_transformers_check.py — lightron's HuggingFace export loaded by `transformers` itself.

    python3 tests/hf_transformers_check.py --workdir DIR

DIR is what tests/hf_check.py leaves behind: hf_gpt2/ and hf_llama/ (config.json +
model.safetensors exported by examples/convert_checkpoint from a tp 2 x pp 2 run) and
logits_<flavour>.safetensors (lightron's logits on a batch). Run where `transformers` and
`safetensors` are installed (the GPU check machine; Debian has neither). Each flavour is
loaded with AutoModelForCausalLM in fp32 and must reproduce lightron's logits within 1e-4.
"""
import argparse
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TOLERANCE = 1e-4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    ok = True
    for name in ("gpt2", "llama"):
        model = AutoModelForCausalLM.from_pretrained(f"{a.workdir}/hf_{name}", torch_dtype=torch.float32).eval()
        dumped = load_file(f"{a.workdir}/logits_{name}.safetensors")
        with torch.no_grad():
            logits = model(dumped["tokens"]).logits
        diff = (logits - dumped["logits"]).abs().max().item()
        good = diff <= TOLERANCE
        ok &= good
        print(f"transformers {type(model).__name__} vs lightron tp2 x pp2 logits: max |diff| {diff:.3e} "
              f"({'PASS' if good else 'FAIL'}, tolerance {TOLERANCE})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
