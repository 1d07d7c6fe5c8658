"""peft's prompt-learning adapters (PROMPT_TUNING, PREFIX_TUNING) in and out of deltatune.

Both keep one tensor, ``prompt_embeddings``; the head (peft's modules_to_save) sits under ``base_model.<head>``
(no ``.model.`` for prompt learning)::

    PROMPT_TUNING  (p, d)          BERT family: <encoder>.embeddings.prompt_tokens   (prompt, insert="input", at 0)
                                   GPT-2/Llama: <stack>.prompt_tokens  (the outputs at the p prompt positions, which
                                   peft returns, are dropped: deltatune's logits are peft's [:, p:])
    PREFIX_TUNING  (p, L * 2 * w)  GPT-2/Llama: <stack>.prefix_kv  (prefix, reparameterize=False); per token, layer
                                   l's keys then values, w = key/value heads * head dim. peft saves the prefixes
                                   its MLP computes, so ``prefix_projection`` files load exactly too.

Refused before the model is touched: encoder-decoder prompts (``num_transformer_submodules=2``), PREFIX_TUNING on
BERT-family encoders (peft feeds prefixes as ``past_key_values``, which transformers 5's BERT family no longer
accepts, and older peft/transformers shifted BERT's positions by p where deltatune's BERT prefix does not), other
prompt-learning types (P-tuning, multitask prompts, CPT), and layouts that do not match the model.
``prompt_tuning_init`` (TEXT, SAMPLE_VOCAB, RANDOM) only matters at init.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core import DeltaState, apply, delta_modules
from deltatune.errors import DeltaTuneError
from deltatune.methods._decoder import DECODERS, kv_shape
from deltatune.methods.prefix import PrefixConfig
from deltatune.methods.prompt import PromptConfig
from deltatune.targeting import family

PROMPT_PREFIX, EMBEDDINGS = "base_model.", "prompt_embeddings"
PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE")


def check_prompt(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Refuses what deltatune's prompt/prefix cannot reproduce, naming the option and what to do."""
    kind, fam = cfg.get("peft_type"), family(model)
    if kind not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise DeltaTuneError(
            f"load_peft: peft_type {kind!r} is not supported (PROMPT_TUNING and PREFIX_TUNING are); retrain it with "
            f"deltatune"
        )
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise DeltaTuneError(
            "load_peft: num_transformer_submodules=2 (encoder-decoder prompts) is not supported: deltatune prompts "
            "one stack; use a BERT-family encoder or a GPT-2/Llama decoder"
        )
    supported = ("bert", *DECODERS) if kind == "PROMPT_TUNING" else DECODERS
    if fam not in supported:
        raise DeltaTuneError(
            f"load_peft: {kind} loads into {'BERT-family encoders and ' if kind == 'PROMPT_TUNING' else ''}GPT-2/Llama "
            f"decoder LMs, not {type(model).__name__}"
            + (": peft runs BERT prefixes as past_key_values (positions shifted by p), which transformers 5's BERT "
               "family no longer takes; retrain with deltatune.apply(model, 'prefix')" if fam == "bert" else "")
        )  # fmt: skip
    prompts, expected = tensors.get(EMBEDDINGS), _width(model, kind)
    if prompts is None or prompts.ndim != 2 or prompts.shape[1] != expected:
        shape = None if prompts is None else tuple(prompts.shape)
        raise DeltaTuneError(f"load_peft: {EMBEDDINGS} must be (num_virtual_tokens, {expected}) here, got {shape}")
    if kind == "PREFIX_TUNING" and int(cfg.get("num_attention_heads") or 0) != kv_shape(model.config)[1]:
        raise DeltaTuneError(
            f"load_peft: num_attention_heads={cfg.get('num_attention_heads')} splits the prefixes into other heads "
            f"than the model's {kv_shape(model.config)[1]} key/value heads; was it trained on this architecture?"
        )


def _width(model: nn.Module, kind: str) -> int:
    """Width of one prompt_embeddings row: the hidden size (prompts) or all layers' keys and values (prefixes)."""
    if kind == "PROMPT_TUNING":
        return model.config.hidden_size
    layers, heads, head_dim = kv_shape(model.config)
    return layers * 2 * heads * head_dim


def load_prompt(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, Tensor], head: str | None) -> None:
    """Applies deltatune's prompt or prefix as peft places them and copies the tensor (checked by ``check_prompt``)."""
    prompts = tensors[EMBEDDINGS]
    p = prompts.shape[0]
    if cfg["peft_type"] == "PROMPT_TUNING":
        config: Any = PromptConfig(num_tokens=p, insert="input", insert_at=0)
    else:
        config = PrefixConfig(num_tokens=p, reparameterize=False)
    apply(model, config, head=head or False)
    with torch.no_grad():
        for _, module in delta_modules(model):
            (module.prompt_tokens if hasattr(module, "prompt_tokens") else module.prefix_kv).copy_(prompts)


def export_prompt(model: nn.Module, state: DeltaState) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """peft's config fields and tensors for a model tuned with one deltatune ``prompt`` or ``prefix`` config."""
    config, fam = state.entries[0].config, family(model)
    wrappers = [m for _, m in delta_modules(model)]
    if config.name == "prompt" and (config.insert != "input" or config.position != 0):
        raise DeltaTuneError(
            "save_peft: peft prepends prompts to the word embeddings; apply prompt with insert='input', "
            f"insert_at=0 to export (this model has insert={config.insert!r}, insert_at={config.position})"
        )
    if config.name == "prefix" and fam not in DECODERS:
        raise DeltaTuneError(
            f"save_peft: peft runs prefix tuning on decoder LMs only here (GPT-2/Llama), not {type(model).__name__}: "
            f"transformers 5's BERT family takes no past_key_values"
        )
    if len(wrappers) != 1:
        raise DeltaTuneError(f"save_peft: peft holds one prompt per model; this one has {len(wrappers)}")
    module, cfg = wrappers[0], model.config
    tensor = module.prompt_tokens if config.name == "prompt" else module.prefixes()
    fields = {
        "peft_type": "PROMPT_TUNING" if config.name == "prompt" else "PREFIX_TUNING",
        "task_type": "CAUSAL_LM" if fam in DECODERS else None, "num_virtual_tokens": tensor.shape[0],
        "num_transformer_submodules": 1, "num_layers": cfg.num_hidden_layers,
    }  # fmt: skip
    if config.name == "prompt":
        fields.update(token_dim=tensor.shape[1], num_attention_heads=cfg.num_attention_heads)
        fields.update(prompt_tuning_init="RANDOM")
    else:
        _, heads, head_dim = kv_shape(cfg)
        fields.update(token_dim=heads * head_dim, num_attention_heads=heads, encoder_hidden_size=heads * head_dim)
        fields.update(prefix_projection=False)
    return fields, {EMBEDDINGS: tensor}
