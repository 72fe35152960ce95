"""Export the LoRA adapters of a Trellis checkpoint in PEFT's format.

    python tools/export_peft.py --ckpt RUN_DIR [--step N] --out DIR

Writes `adapter_config.json` and `adapter_model.safetensors` with Hugging Face module names
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, ...), so `peft` loads them
on a `transformers` model of the converted base (`tools/convert_checkpoint.py trellis-to-hf`).
Trellis fuses q/k/v and gate/up into one linear with one A and a B per block; PEFT has one
module per projection, so each targeted block becomes its own adapter that shares that A,
which computes exactly the same update. Llama, Mistral and Qwen2 families (not GPT-2, whose
fused Conv1D has no per-projection modules in PEFT's naming).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safetensors.torch import save_file  # noqa: E402

from engine.checkpoint import CheckpointError, read_meta, resolve_step_dir, stored_shapes  # noqa: E402
from models.hf_mapping import infer_family, tensor_maps  # noqa: E402
from tools.convert_checkpoint import read_trellis_tensor  # noqa: E402
from tools.merge_lora import adapter_of, lora_scale_of  # noqa: E402

PEFT_PREFIX = "base_model.model."


def adapter_tensors(step_dir: str, family: str, model: dict, shapes: dict):
    """{PEFT tensor name: tensor} and the targeted HF module names, one tensor at a time."""
    tensors, targets = {}, set()
    for tmap in tensor_maps(family, model):
        if len(tmap.keys) != 1 or not tmap.hf_name.endswith(".weight"):
            continue
        adapter = adapter_of(tmap.keys[0], shapes)
        if adapter is None:
            continue
        module = PEFT_PREFIX + tmap.hf_name[: -len(".weight")]
        a_key, b_key = adapter
        tensors[module + ".lora_A.weight"] = read_trellis_tensor(step_dir, a_key, shapes[a_key]).contiguous()
        tensors[module + ".lora_B.weight"] = read_trellis_tensor(step_dir, b_key, shapes[b_key]).contiguous()
        targets.add(tmap.hf_name.split(".")[-2])
    return tensors, sorted(targets)


def export_peft(ckpt: str, out: str, step: int = -1) -> str:
    step_dir = resolve_step_dir(ckpt, step)
    meta = read_meta(step_dir)
    lora_scale_of(meta)  # refuses checkpoints of runs without LoRA
    model, finetune = meta["model"], meta["config"]["finetune"]
    family = meta.get("hf_family") or infer_family(model)
    if family == "gpt2":
        raise CheckpointError("PEFT export supports the llama, mistral and qwen2 families, not gpt2")
    tensors, targets = adapter_tensors(step_dir, family, model, stored_shapes(step_dir))
    if not tensors:
        raise CheckpointError(f"{step_dir} holds no LoRA adapters")
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": finetune["lora_rank"],
              "lora_alpha": finetune["lora_alpha"], "lora_dropout": finetune["lora_dropout"],
              "use_rslora": bool(finetune["lora_rslora"]), "target_modules": targets, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None}
    with open(os.path.join(out, "adapter_config.json"), "w") as handle:
        json.dump(config, handle, indent=1)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint directory of a finetune.method lora run")
    parser.add_argument("--step", type=int, default=-1, help="step to export (default: latest)")
    parser.add_argument("--out", required=True, help="directory for adapter_config.json + adapter_model.safetensors")
    args = parser.parse_args(argv)
    try:
        out = export_peft(args.ckpt, args.out, args.step)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote PEFT adapter to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
