"""Convert a GGUF file into a bf16 safetensors checkpoint laid out as a Hugging Face cache entry.

Runs with the ENGINE environment's Python (torch + transformers, plus `gguf` and `accelerate`), never with sage-llm's:

    python gguf_import.py FILE.gguf HF_HUB_CACHE ORG/NAME [--work DIR]

transformers dequantizes the GGUF tensors (GgufConfig(dequantize=True)); the quantization config is dropped so the
model saves as an ordinary checkpoint, which vLLM serves (vLLM 0.33 no longer loads GGUF itself). The tokenizer and
its chat template come from the GGUF metadata. Progress lines start with "STEP ", the final line with "RESULT " (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def step(msg: str) -> None:
    print(f"STEP {msg}", flush=True)


def convert(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: plain gguf_file= dequantizes by itself
        GgufConfig = None

    folder, name = str(gguf.parent), gguf.name
    t0 = time.monotonic()
    step(f"reading tokenizer from {name}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    step(f"loading and dequantizing weights from {name}")
    kwargs = {"gguf_file": name, "dtype": torch.bfloat16}
    if GgufConfig is not None:
        kwargs["quantization_config"] = GgufConfig(gguf_file=name, dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except TypeError:  # transformers that still calls it torch_dtype
        kwargs["torch_dtype"] = kwargs.pop("dtype")
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model = model.to(torch.bfloat16)
    # a dequantized model still carries the GGUF quantization config, and saving refuses it ("not serializable")
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                obj.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr != "is_quantized" else False)
            except (AttributeError, TypeError):
                pass
    if hasattr(model.config, "dtype"):
        model.config.dtype = torch.bfloat16
    else:
        model.config.torch_dtype = torch.bfloat16
    step(f"loaded {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters in "
         f"{time.monotonic() - t0:.1f} s; saving safetensors")
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(out_dir)
        except Exception:  # an invalid generation config is not worth failing the import for
            pass
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("repo_id")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir in cache_dir)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_layout import layout  # the sibling script: stdlib only

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-import-", dir=args.work or args.cache_dir) as work:
        out_dir = Path(work) / "checkpoint"
        out_dir.mkdir()
        convert(args.gguf, out_dir)
        step(f"laying out {args.repo_id} in {args.cache_dir}")
        # the same filesystem as the cache: the weights are moved into blobs/, not copied
        snap = layout(out_dir, args.cache_dir, args.repo_id, move=True)
    size = sum(os.stat(p).st_size for p in snap.rglob("*") if p.is_file())
    print("RESULT " + json.dumps({"snapshot": str(snap), "size": size}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
