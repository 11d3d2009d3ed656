"""The Anima network (DiT + LLM adapter), its config, and official-checkpoint I/O.

See docs/model.md; parameter names equal the official keys without ``net.``.
"""

from .config import AdapterConfig, AnimaConfig, infer_config
from .dit import Anima
from .llm_adapter import LLMAdapter
from .state_dict import build_anima, load_anima, official_state_dict, read_safetensors_header, save_anima

__all__ = [
    "AdapterConfig",
    "Anima",
    "AnimaConfig",
    "LLMAdapter",
    "build_anima",
    "infer_config",
    "load_anima",
    "official_state_dict",
    "read_safetensors_header",
    "save_anima",
]
