"""torch_ops: autograd functions, nn.Modules and optimizers over qkernels, with
bitsandbytes' names, signatures and state_dict keys.

    layers:      Linear8bitLt (Int8Params), Linear4bit / LinearNF4 / LinearFP4 (Params4bit),
                 SwitchBackLinear (+ Global / GlobalMemEfficient / Vectorwise), LinearFP8Mixed,
                 LinearFP8Global, LoRA, StableEmbedding / Embedding (32-bit optimizer state)
    conversion:  replace_linear(model, kind, skip=(...), **options)
    adapters:    add_lora(model, targets=...), merge_lora, lora_state_dict; torch_ops.peft_lora (PEFT)
    transformers: QKernelsConfig (from_pretrained's quantization_config; imports transformers
                 on first use)
    optimizers:  torch_ops.optim (Adam8bit, AdamW8bit, paged variants, GlobalOptimManager)
"""
from .embedding import Embedding, StableEmbedding
from .fp8 import LinearFP8Global, LinearFP8Mixed, matmul_fp8_global, matmul_fp8_mixed
from .linear4bit import Linear4bit, LinearFP4, LinearNF4, Params4bit, matmul_4bit
from .linear8bit import Int8Params, Linear8bitLt
from qkernels.int8.matmul_lt import MatmulLtState, matmul
from .lora import LoRA, add_lora, load_lora_state_dict, lora_state_dict, merge_lora
from .replace import replace_linear
from .switchback import (SwitchBackLinear, SwitchBackLinearGlobal, SwitchBackLinearGlobalMemEfficient,
                         SwitchBackLinearVectorwise)
from . import optim

__all__ = [
    "Linear8bitLt", "Int8Params", "MatmulLtState", "matmul",
    "Linear4bit", "LinearNF4", "LinearFP4", "Params4bit",
    "matmul_4bit",
    "SwitchBackLinear", "SwitchBackLinearGlobal", "SwitchBackLinearGlobalMemEfficient",
    "SwitchBackLinearVectorwise", "LinearFP8Mixed", "LinearFP8Global", "matmul_fp8_mixed",
    "matmul_fp8_global", "LoRA", "add_lora", "merge_lora", "lora_state_dict", "load_lora_state_dict",
    "replace_linear", "optim", "QKernelsConfig", "StableEmbedding", "Embedding",
]


def __getattr__(name):
    # QKernelsConfig lives in torch_ops.hf, which imports transformers: loaded on first use only.
    if name == "QKernelsConfig":
        from .hf import QKernelsConfig
        return QKernelsConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
