"""Int8 CPU inference: the vision tower's linear layers with int8 weights and dynamic int8 activations, as a
transformers quantization method (`quantization_config=Int8DynamicConfig()`); a quantized model cannot be saved."""

import warnings

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin


logger = logging.get_logger(__name__)

QUANT_METHOD = "streetclip_int8_dynamic"
# CPU back ends of PyTorch that have int8 dynamic linear kernels, best first.
INT8_ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")


@register_quantization_config(QUANT_METHOD)
class Int8DynamicConfig(QuantizationConfigMixin):
    """Quantize the vision tower to int8 for CPU inference, as `from_pretrained`'s `quantization_config`."""

    def __init__(self, quant_method: str = QUANT_METHOD):
        # `quant_method` is the one key of its dict form (`to_dict`/`from_dict`); anything else is a mistake.
        if quant_method != QUANT_METHOD:
            raise ValueError(f"Int8DynamicConfig is quant_method {QUANT_METHOD!r}, got {quant_method!r}.")
        self.quant_method = quant_method


class Int8DtypeError(Exception):
    """Int8 in another dtype than float32; not a `ValueError`, which `pipeline` would retry in float32."""


def int8_engine() -> str:
    """The PyTorch back end for int8 linear layers, of `INT8_ENGINES`; `ImportError` where there is none."""
    if not hasattr(getattr(getattr(torch, "ao", None), "quantization", None), "quantize_dynamic"):
        raise ImportError(
            f"int8 quantization needs torch.ao.quantization.quantize_dynamic, which PyTorch {torch.__version__} "
            "does not ship; install a PyTorch that has it (2.4 to 2.13 do), or run in float32 or bfloat16."
        )
    supported = torch.backends.quantized.supported_engines
    engines = (torch.backends.quantized.engine, *INT8_ENGINES)  # the one set, if it has int8 kernels
    if engine := next((engine for engine in engines if engine in INT8_ENGINES and engine in supported), None):
        return engine
    raise ImportError(
        f"int8 quantization needs a quantized CPU back end ({', '.join(INT8_ENGINES)}); this PyTorch build "
        f"({torch.__version__}) has only {supported}. Run in float32 or bfloat16 instead."
    )


def quantize_vision_tower(model: nn.Module) -> None:
    """Replace, in place, the linear layers of `model.vision_model`, nearly all inference time, by int8 dynamic ones;
    the visual projection stays float32 with the heads, which are sized from it."""
    torch.backends.quantized.engine = int8_engine()
    with warnings.catch_warnings():
        # The announced move to torchao: `int8_engine` already turns its absence into a clear error.
        warnings.filterwarnings("ignore", message=r"torch\.(ao\.quantization is|quantize_per_tensor.* are) deprecated")
        torch.ao.quantization.quantize_dynamic(model.vision_model, {nn.Linear}, dtype=torch.qint8, inplace=True)


@register_quantizer(QUANT_METHOD)
class Int8DynamicQuantizer(HfQuantizer):
    """Applies [`Int8DynamicConfig`] after the float32 weights are loaded (there is no int8 checkpoint format)."""

    is_trainable = False

    def validate_environment(self, device_map=None, **kwargs):
        int8_engine()
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if devices - {None, "cpu", torch.device("cpu")}:
            raise ValueError(
                f"int8 dynamic quantization runs on the CPU only, got device_map={device_map!r}; load on the CPU, "
                "or use bfloat16 on a GPU."
            )

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        if dtype not in (None, "auto", torch.float32):
            raise Int8DtypeError(
                f"int8 dynamic quantization computes in float32, got dtype={dtype}; load with torch.float32 (the "
                "default), or use that dtype without quantization."
            )
        return torch.float32

    def _process_model_after_weight_loading(self, model, **kwargs):
        quantize_vision_tower(model)
        return model

    def is_serializable(self) -> bool:
        logger.warning(
            "An int8 dynamically quantized StreetCLIP cannot be saved: its packed int8 weights have no safetensors "
            "form. Save the float32 model and pass `quantization_config=Int8DynamicConfig()` when loading it."
        )
        return False


__all__ = ["Int8DtypeError", "Int8DynamicConfig", "Int8DynamicQuantizer", "int8_engine", "quantize_vision_tower"]
