"""peft's prompt-learning adapters (PROMPT_TUNING; PREFIX_TUNING refused) in and out of deltatune.

peft's prompt tuning prepends p learned vectors to the word embeddings and p ones to the attention mask (token
type 0 where token types are given): deltatune's ``prompt`` with ``insert="input", insert_at=0`` exactly::

    prompt_embeddings (p, d)            ->  <encoder>.embeddings.prompt_tokens (p, d)
    base_model.<head>.<param>           ->  the trained head (peft's modules_to_save; no ".model." for prompt learning)

Supported: HF BERT-family encoders (deltatune's ``prompt`` families). Refused before the model is touched:
encoder-decoder prompts (``num_transformer_submodules=2``), decoder LMs (GPT-2, Llama: deltatune's ``prompt`` has
no decoder form), and PREFIX_TUNING, whose keys and values reach the model as ``past_key_values``: the
transformers 5 BERT family accepts none (peft itself cannot run it there), and deltatune's ``prefix`` has no GPT-2
or Llama form, so no model runs both. ``prompt_tuning_init`` (TEXT, SAMPLE_VOCAB, RANDOM) only matters at init.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core import DeltaState, apply, delta_modules
from deltatune.errors import DeltaTuneError
from deltatune.methods.prompt import PromptConfig, SoftPrompt
from deltatune.targeting import family

PROMPT_PREFIX, EMBEDDINGS = "base_model.", "prompt_embeddings"
PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE")


def check_prompt(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> int:
    """Refuses what deltatune's prompt cannot reproduce (naming the option and what to do); returns p."""
    kind = cfg.get("peft_type")
    if kind == "PREFIX_TUNING":
        raise DeltaTuneError(
            "load_peft: peft_type 'PREFIX_TUNING' is not supported: peft feeds the prefixes as past_key_values, "
            "which transformers 5's BERT family no longer accepts, and deltatune's prefix method has no GPT-2/Llama "
            "form, so no model runs both; retrain with deltatune.apply(model, 'prefix') on a BERT-family encoder"
        )
    if kind != "PROMPT_TUNING":
        raise DeltaTuneError(
            f"load_peft: peft_type {kind!r} is not supported (PROMPT_TUNING is); retrain it with deltatune"
        )
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise DeltaTuneError(
            "load_peft: num_transformer_submodules=2 (encoder-decoder prompts) is not supported: deltatune's prompt "
            "prepends to one encoder's input; use a BERT-family encoder"
        )
    if family(model) != "bert":
        raise DeltaTuneError(
            f"load_peft: PROMPT_TUNING loads into HF BERT-family encoders (deltatune's prompt), not "
            f"{type(model).__name__}; decoder-LM prompts are not supported: run that adapter with peft"
        )
    prompts = tensors.get(EMBEDDINGS)
    width = model.config.hidden_size
    if prompts is None or prompts.ndim != 2 or prompts.shape[1] != width:
        shape = None if prompts is None else tuple(prompts.shape)
        raise DeltaTuneError(f"load_peft: {EMBEDDINGS} must be (num_virtual_tokens, {width}), got {shape}")
    return prompts.shape[0]


def load_prompt(model: nn.Module, tensors: dict[str, Tensor], head: str | None) -> None:
    """Applies deltatune's prompt at peft's insertion point and copies the prompts (checked by ``check_prompt``)."""
    prompts = tensors[EMBEDDINGS]
    apply(model, PromptConfig(num_tokens=prompts.shape[0], insert="input", insert_at=0), head=head or False)
    with torch.no_grad():
        for _, module in delta_modules(model):
            module.prompt_tokens.copy_(prompts)


def export_prompt(model: nn.Module, state: DeltaState) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """peft's PromptTuningConfig fields and tensors for a model tuned with one deltatune ``prompt`` config."""
    config = state.entries[0].config
    if config.insert != "input" or config.position != 0:
        raise DeltaTuneError(
            "save_peft: peft prepends prompts to the word embeddings; apply prompt with insert='input', "
            f"insert_at=0 to export (this model has insert={config.insert!r}, insert_at={config.position})"
        )
    wrappers = [m for _, m in delta_modules(model) if isinstance(m, SoftPrompt)]
    if len(wrappers) != 1:
        raise DeltaTuneError(f"save_peft: peft holds one prompt per model; this one has {len(wrappers)} encoders")
    prompts = wrappers[0].prompt_tokens
    cfg = model.config
    fields = {
        "peft_type": "PROMPT_TUNING", "num_virtual_tokens": prompts.shape[0], "token_dim": prompts.shape[1],
        "num_transformer_submodules": 1, "num_attention_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_hidden_layers, "prompt_tuning_init": "RANDOM",
    }  # fmt: skip
    return fields, {EMBEDDINGS: prompts}
