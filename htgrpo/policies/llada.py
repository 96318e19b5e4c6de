"""LLaDA-architecture masked-diffusion transformer (the backbone of MMaDA and Lumina-DiMOO).

Written from the architecture description (reference/htgrpo_mmada_dimoo.md §3), readable top to bottom:

    tokens -> wte -> n_layers x [x + attn(attn_norm(x)); x + mlp(ff_norm(x))] -> ln_f -> ff_out (LM head)

- RMSNorm (LLaDA's ``layer_norm_type: rms``, computed in float32), rotary position embeddings (rotate-half, full
  precision), SwiGLU MLP ``ff_out(silu(ff_proj(x)) * up_proj(x))``, no biases by default.
- Attention is **bidirectional** (never causal). ``attention_mask`` is a padding mask only: keys where it is 0 are
  never attended. (LLaDA's own code turns a bare ``attention_mask`` into a *causal* bias; we do not copy that quirk.)
- Grouped-query attention when ``n_kv_heads < n_heads`` (query head h reads key/value head h // group).
- Parameter names are LLaDA's exactly, so real MMaDA / LLaDA / Lumina-DiMOO checkpoints load with ``from_pretrained``:
  ``model.transformer.wte``, ``model.transformer.blocks.{i}.{attn_norm,ff_norm,q_proj,k_proj,v_proj,attn_out,
  ff_proj,up_proj,ff_out}``, ``model.transformer.ln_f``, ``model.transformer.ff_out`` (untied LM head).

Besides the usual ``forward`` (full logits), :meth:`LLaDAModelLM.final_hidden` returns the normalised hidden states at
chosen positions and :meth:`LLaDAModelLM.project` applies only a column range of the LM head, so image generators
compute logits only at image positions and only over the image-code columns (8192 of MMaDA's 134656).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

Positions = slice | torch.Tensor | None
"""Sequence positions to keep: a slice, a LongTensor (K,) shared by the batch, or (B, K) per row; None = all."""


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


class LLaDAConfig(PreTrainedConfig):
    """LLaDA's ``config.json`` fields (names as in GSAI-ML/LLaDA-8B and Gen-Verse/MMaDA-8B).

    Unknown keys in a real ``config.json`` (``auto_map``, ``codebook_size``, ``init_fn``, …) are kept as attributes,
    and ``model_type: "mmada"`` files load too (transformers logs a type-mismatch note). The architecture switches
    below are validated by the model: only LLaDA-8B's values are implemented, anything else is a clear error.
    """

    model_type = "llada"

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None
    """None -> n_heads (multi-head); smaller -> grouped-query attention."""
    multi_query_attention: bool | None = None
    """LLaDA/OLMo switch: True means a single key/value head."""
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = None
    """SwiGLU width (ff_proj/up_proj output); None -> mlp_ratio * d_model."""
    vocab_size: int = 126464
    embedding_size: int | None = None
    """Rows of wte / ff_out (>= vocab_size, padded); None -> vocab_size. MMaDA: 134656."""
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    include_bias: bool = False
    include_qkv_bias: bool = False
    weight_tying: bool = False
    tie_word_embeddings: bool = False
    mask_token_id: int = 126336
    pad_token_id: int | None = None
    """LLaDA-8B: 126081."""
    eos_token_id: int | None = None
    """LLaDA-8B: 126081."""
    init_std: float = 0.02
    image_grid: list[int] | None = None
    """Toy-model extension, not in LLaDA/MMaDA (None there): ``[offset, rows, cols]`` adds learned row and column
    embeddings (``model.transformer.grid_row`` / ``grid_col``) to the token embeddings of the rows x cols image tokens
    that start at sequence position ``offset``. 1D RoPE alone makes a tiny model spend most of a CPU warm start
    discovering that token i+cols sits below token i; this hands it the 2D layout."""
    # Architecture switches of LLaDA/OLMo; only these values are implemented (checked in LLaDAModelLM.__init__).
    activation_type: str = "silu"
    block_type: str = "llama"
    layer_norm_type: str = "rms"
    rope: bool = True
    alibi: bool = False
    attention_layer_norm: bool = False
    input_emb_norm: bool = False
    scale_logits: bool = False
    clip_qkv: float | None = None
    block_group_size: int = 1
    # The other fields of the released ``ModelConfig`` (folder_compat.LLADA_MODEL_CONFIG_FIELDS), declared so that
    # every config.json htgrpo writes carries them. MMaDA's loader reads each one (AttributeError when one is missing).
    # DiMOO's loader fills a missing one with the dataclass default, e.g. dropout 0.1. The values are LLaDA-8B's
    # released ones. This model does not compute dropout, ALiBi or flash attention. The init_* fields only matter to
    # the released code when it initialises weights itself.
    alibi_bias_max: float = 8.0
    rope_full_precision: bool = True
    flash_attention: bool = False
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    layer_norm_with_affine: bool = True
    attention_layer_norm_with_affine: bool = True
    bias_for_layer_norm: bool | None = False
    init_device: str | None = "meta"
    init_fn: str = "mitchell"
    init_cutoff_factor: float | None = None
    precision: str | None = "amp_bf16"
    use_cache: bool = False

    def to_diff_dict(self) -> dict[str, Any]:
        """What ``config.json`` holds: transformers 5's keys plus the 4.x names of the changed ones
        (``torch_dtype``; see :func:`htgrpo.policies.folder_compat.v4_config_keys`). A config read from a checkpoint
        keeps that checkpoint's ``model_type``. transformers would write the class's ``"llada"``, and then an
        exported MMaDA folder would no longer be a ``model_type: mmada`` checkpoint."""
        from htgrpo.policies.folder_compat import v4_config_keys

        out = v4_config_keys(super().to_diff_dict())
        out["model_type"] = self.__dict__.get("model_type") or out.get("model_type", self.model_type)
        return out

    @property
    def effective_n_kv_heads(self) -> int:
        if self.multi_query_attention:
            return 1
        return self.n_heads if self.n_kv_heads is None else int(self.n_kv_heads)

    @property
    def effective_mlp_hidden_size(self) -> int:
        return int(self.mlp_hidden_size) if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def effective_embedding_size(self) -> int:
        return int(self.embedding_size) if self.embedding_size is not None else int(self.vocab_size)

    def unsupported_features(self) -> list[str]:
        """Config values this implementation does not compute (empty for LLaDA-8B / MMaDA / DiMOO)."""
        expected = {
            "activation_type": ("silu", "swiglu"),
            "block_type": ("llama",),
            "layer_norm_type": ("rms",),
            "rope": (True,),
            "alibi": (False,),
            "attention_layer_norm": (False,),
            "input_emb_norm": (False,),
            "scale_logits": (False,),
            "clip_qkv": (None,),
            "block_group_size": (1,),
        }
        bad = [f"{k}={getattr(self, k)!r} (supported: {v})" for k, v in expected.items() if getattr(self, k) not in v]
        if self.d_model % self.n_heads:
            bad.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.effective_n_kv_heads:
            bad.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.effective_n_kv_heads}")
        return bad


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (seq_len, head_dim) in float32 for positions 0..seq_len-1 (rotate-half layout: freqs twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1 = token, 0 = pad  ->  additive key bias (B, 1, 1, T): 0 on tokens, dtype-min on pads.

    Only keys are masked, so pad *queries* still see the real tokens (no all-masked row, hence no NaN); their outputs
    are never read.
    """
    keep = attention_mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~keep, torch.finfo(dtype).min
    )


class LLaDABlock(GradientCheckpointingLayer):
    """One LLaDA "llama" block: pre-norm bidirectional attention + pre-norm SwiGLU MLP, both residual."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.n_kv_heads = config.effective_n_kv_heads
        self.head_dim = d // config.n_heads
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        hidden = config.effective_mlp_hidden_size

        self.attn_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)

        self.ff_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, hidden, bias=config.include_bias)  # gate
        self.up_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.ff_out = nn.Linear(hidden, d, bias=config.include_bias)  # down

    def attention(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # LLaDA applies RoPE in full precision (rope_full_precision: true).
        q_rot, k_rot = apply_rotary_pos_emb(q.float(), k.float(), cos[None], sin[None])
        q, k = q_rot.to(v.dtype), k_rot.to(v.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, is_causal=False, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.attn_out(y.transpose(1, 2).reshape(B, T, -1))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), cos, sin, bias)
        return x + self.mlp(self.ff_norm(x))


class LLaDAModel(nn.Module):
    """Holds ``transformer = {wte, blocks, ln_f, ff_out}`` so parameter names match LLaDA's checkpoints."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        modules: dict[str, nn.Module] = {
            "wte": nn.Embedding(config.effective_embedding_size, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            "ln_f": LlamaRMSNorm(config.d_model, eps=config.rms_norm_eps),
        }
        if config.image_grid is not None:
            _, rows, cols = (int(v) for v in config.image_grid)
            modules["grid_row"] = nn.Embedding(rows, config.d_model)
            modules["grid_col"] = nn.Embedding(cols, config.d_model)
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.effective_embedding_size, bias=config.include_bias)
        self.transformer = nn.ModuleDict(modules)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class LLaDAModelLM(PreTrainedModel):
    """LLaDA masked-diffusion LM with transformers' save/load (``save_pretrained`` writes safetensors)."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        bad = config.unsupported_features()
        if bad:
            raise ValueError("LLaDAModelLM does not implement this config: " + "; ".join(bad))
        self.model = LLaDAModel(config)
        self.post_init()

    # -- transformers plumbing ----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained``, keeping the checkpoint's ``architectures`` (``MMadaModelLM``,
        ``LLaDAForMultiModalGeneration``) in ``config.json``. transformers would replace them with this class's name."""
        released = list(self.config.architectures or [])
        super().save_pretrained(save_directory, *args, **kwargs)
        if released and released != list(self.config.architectures or []):
            self.config.architectures = released
            self.config.to_json_file(os.path.join(str(save_directory), "config.json"))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer["wte"]

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer["wte"] = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return None if self.config.weight_tying else self.model.transformer["ff_out"]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(embedding_size, d_model) matrix of the LM head (``wte`` when weight_tying)."""
        t = self.model.transformer
        return t["wte"].weight if self.config.weight_tying else t["ff_out"].weight

    # -- computation --------------------------------------------------------------------------------------------
    def _run_blocks(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attention_bias: torch.Tensor | None,
        collect: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        t = self.model.transformer
        x = t["wte"](input_ids)
        T = input_ids.shape[1]
        if self.config.image_grid is not None:
            x = self._add_grid_embedding(x)
        # RoPE has no learned position table: max_sequence_length is the trained length, not a hard limit.
        head_dim = self.config.d_model // self.config.n_heads
        cos, sin = rotary_cos_sin(T, head_dim, float(self.config.rope_theta), x.device)
        if attention_bias is not None:  # LLaDA-style explicit bias: bool (keep) or additive float, (B|1, 1|H, T, T)
            bias = attention_bias
            if bias.dtype == torch.bool:
                neg = torch.finfo(x.dtype).min
                bias = torch.zeros(bias.shape, dtype=x.dtype, device=x.device).masked_fill(~bias, neg)
            bias = bias.to(x.dtype)
        elif attention_mask is not None and not bool(attention_mask.all()):
            bias = padding_bias(attention_mask, x.dtype)
        else:
            bias = None  # no padding: plain full attention
        for block in t["blocks"]:
            if collect is not None:
                collect.append(x)
            x = block(x, cos, sin, bias)
        return x

    def _add_grid_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """x[:, offset + r*cols + c] += grid_row[r] + grid_col[c] (see ``LLaDAConfig.image_grid``)."""
        offset, rows, cols = (int(v) for v in self.config.image_grid)
        t = self.model.transformer
        grid = (t["grid_row"].weight[:, None, :] + t["grid_col"].weight[None, :, :]).reshape(rows * cols, -1)
        if offset + rows * cols > x.shape[1]:
            raise ValueError(f"image_grid {self.config.image_grid} does not fit a sequence of length {x.shape[1]}")
        pad_front = x.new_zeros(offset, x.shape[-1])
        pad_back = x.new_zeros(x.shape[1] - offset - rows * cols, x.shape[-1])
        return x + torch.cat([pad_front, grid.to(x.dtype), pad_back])[None]

    def final_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: Positions = None,
        attention_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after ``ln_f``, only at ``positions`` -> (B, K, d_model) (K = T when positions is None)."""
        x = self._run_blocks(input_ids, attention_mask, attention_bias)
        x = select_positions(x, positions)
        return self.model.transformer["ln_f"](x)

    def project(self, hidden: torch.Tensor, columns: slice | None = None) -> torch.Tensor:
        """Logits for a column range of the LM head only: ``hidden @ W[columns].T`` -> (..., len(columns))."""
        weight = self.lm_head_weight
        head = None if self.config.weight_tying else self.model.transformer["ff_out"]
        bias = head.bias if head is not None else None
        if columns is not None:
            weight = weight[columns]
            bias = bias[columns] if bias is not None else None
        return F.linear(hidden, weight, bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Full logits (B, T, embedding_size). ``attention_mask``: (B, T) padding mask (1 = token); never causal."""
        if past_key_values is not None or use_cache:
            raise ValueError("LLaDAModelLM has no KV cache (bidirectional masked diffusion)")
        collect: list[torch.Tensor] | None = [] if output_hidden_states else None
        x = self._run_blocks(input_ids, attention_mask, attention_bias, collect)
        x = self.model.transformer["ln_f"](x)
        logits = self.project(x)
        hidden_states = (*collect, x) if collect is not None else None
        if return_dict is False:
            return (logits,) if hidden_states is None else (logits, hidden_states)
        return CausalLMOutputWithPast(logits=logits, hidden_states=hidden_states)


def select_positions(x: torch.Tensor, positions: Positions) -> torch.Tensor:
    """Rows of (B, T, D) at ``positions`` (slice, (K,) or (B, K) LongTensor) -> (B, K, D)."""
    if positions is None:
        return x
    if isinstance(positions, slice):
        return x[:, positions]
    if positions.dim() == 1:
        return x.index_select(1, positions.to(x.device))
    if positions.dim() == 2:
        idx = positions.to(x.device)[..., None].expand(-1, -1, x.shape[-1])
        return x.gather(1, idx)
    raise ValueError(f"positions must be a slice, (K,) or (B, K) tensor, got shape {tuple(positions.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


class CheckpointNotFoundError(FileNotFoundError):
    """A backbone checkpoint is neither a local folder nor downloadable (offline / unknown id)."""


KNOWN_CHECKPOINTS = {
    "Gen-Verse/MMaDA-8B-Base": "MMaDA base (pretrain + instruction tuning)",
    "Gen-Verse/MMaDA-8B-MixCoT": "MMaDA after mixed long-CoT SFT",
    "Alpha-VLLM/Lumina-DiMOO": "Lumina-DiMOO",
}


def load_llada(path_or_id: str | os.PathLike, config_key: str = "policy.backbone_path", **kwargs: Any) -> LLaDAModelLM:
    """``LLaDAModelLM.from_pretrained`` with an actionable error when the checkpoint is unavailable.

    ``path_or_id``: a local folder with ``config.json`` + safetensors, or a hub id (needs the network unless it is in
    the local HF cache). ``config_key`` is named in the error as the setting to point at a downloaded folder.
    ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype=torch.bfloat16``).
    """
    name = str(path_or_id)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") != 1
    example = "Gen-Verse/MMaDA-8B-Base" if looks_local else name
    folder = "/path/to/" + example.split("/")[-1]
    hint = (
        f"Download it on a machine with network access, e.g. `hf download {example} --local-dir {folder}`,"
        f" copy the folder here, and set `{config_key}={folder}`."
        f" Known LLaDA-architecture checkpoints: {', '.join(KNOWN_CHECKPOINTS)}."
    )
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise CheckpointNotFoundError(f"{name!r} is a folder but has no config.json, so it is not a checkpoint. {hint}")
    if looks_local and not os.path.isdir(name):
        raise CheckpointNotFoundError(f"checkpoint folder {name!r} does not exist. {hint}")
    try:
        return LLaDAModelLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(name) and not isinstance(err, OSError):
            raise  # a real folder with an unsupported config: not a download problem
        if offline and not os.path.isdir(name):
            why = "HF_HUB_OFFLINE is set and it is not in the local cache"
        else:
            why = f"{type(err).__name__}: {err}"
        raise CheckpointNotFoundError(f"cannot load LLaDA checkpoint {name!r} ({why}). {hint}") from err
