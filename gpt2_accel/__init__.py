"""gpt2_accel: train and finetune GPT-2-class language models the Hugging Face way.

Importing the package registers ``GPT2AccelConfig`` / ``GPT2AccelForCausalLM`` with transformers' Auto classes,
so ``AutoModelForCausalLM.from_pretrained(run_dir)`` works for any run directory this toolkit writes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_gpt2_accel import GPT2AccelConfig
from .decode import fast_sample
from .lora import register_peft_defaults
from .modeling_gpt2_accel import GPT2AccelForCausalLM, GPT2AccelModel
from .versions import check_installed_versions

__version__ = "0.2.0"

check_installed_versions()  # warns once per dependency outside the tested range; never fails

AutoConfig.register(GPT2AccelConfig.model_type, GPT2AccelConfig, exist_ok=True)
AutoModel.register(GPT2AccelConfig, GPT2AccelModel, exist_ok=True)
AutoModelForCausalLM.register(GPT2AccelConfig, GPT2AccelForCausalLM, exist_ok=True)

# save_pretrained writes `auto_map` and copies the configuration/modeling/attention files next to the weights, so
# people without this package load a checkpoint with trust_remote_code=True.
GPT2AccelConfig.register_for_auto_class()
GPT2AccelModel.register_for_auto_class("AutoModel")
GPT2AccelForCausalLM.register_for_auto_class("AutoModelForCausalLM")

# generate()'s greedy and sampling loop runs on gpt2_accel.decode's static-cache decoder where that computes the model
# exactly (else transformers' loop runs): the model file cannot import this package, so the package plugs it in.
GPT2AccelForCausalLM.fast_sample = fast_sample

# PEFT's LoraConfig() without target_modules finds ours (c_attn, c_proj, c_fc) for model_type gpt2_accel.
register_peft_defaults()

__all__ = ["GPT2AccelConfig", "GPT2AccelForCausalLM", "GPT2AccelModel", "__version__"]
