"""Decoders built from torchtune's modules: the Llama family (RMSNorm, SwiGLU, RoPE, GQA;
optional attention biases as in Qwen2 and Llama-3 scaled RoPE), OPT (LayerNorm, ReLU
MLP, learned positions) and GPT-NeoX (Pythia: LayerNorm, GELU MLP, RoPE over a part of
each head, attention and MLP side by side), the layouts that pretrained teachers come in.

Layer numbering follows the Hugging Face ``hidden_states`` convention everywhere in
this project: layer 0 is the token embedding output, layer ``i`` (1..L) is the output
of block ``i``, and layer ``L`` (the last) is taken AFTER the final norm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.llama3_2._component_builders import llama3_mlp
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

from letrecipes.components.registry import ComponentError, register


MAX_SIZE = 2**31 - 1  # a size past it is no model's, and overflows torch's 32-bit index arithmetic


MAX_POSITIONS = 2**24  # data.seq_len's bound; a teacher's too (hf_teacher, gguf_teacher)
# A bound on a model's blocks read from a config (Llama 3.1 405B has 126): transformers builds each
# block as Python objects even on the meta device, and 10**9 of them never finished
MAX_BLOCKS = 4096
MAX_BLOCKS = 4096


@dataclass
class ModelArgs:
    """Everything needed to rebuild a model; saved next to its weights as JSON."""

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    # The fields below only matter for pretrained teachers; their defaults are this
    # project's own students (and keep older exported configs loadable).
    family: str = "llama"                  # llama | opt | gpt2 | gpt_neox
    head_dim: Optional[int] = None         # None = embed_dim // num_heads
    qkv_bias: bool = False                 # Qwen2: biases on q, k, v
    output_bias: bool = False              # attention output projection bias
    rope_scaling: Optional[dict] = None    # Llama-3.1+: {factor, low_freq_factor, high_freq_factor,
    #                                        original_max_position_embeddings}, or, from a GGUF file,
    #                                        {frequency_factors: [one per pair of features]}
    qk_norm: bool = False                  # Qwen3: RMSNorm over each head of q and k, before RoPE
    rotary_fraction: float = 1.0           # GPT-NeoX: RoPE turns the first fraction of each head (Pythia: 0.25)
    parallel_residual: bool = False        # GPT-NeoX: x + attn(norm1 x) + mlp(norm2 x)
    mlp_activation: str = "gelu"           # GPT-NeoX's and GPT-2's MLP: gelu (exact) | gelu_tanh
    stated_params: Optional[int] = None    # a teacher transformers runs: its parameters as counted on the meta
    #                                        device (a mixture of experts' every expert), where the shape above
    #                                        describes one dense block

    @classmethod
    def from_dict(cls, values: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ComponentError(f"unknown model keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    def validate(self, key: str = "model") -> None:
        self._check_kinds(key)
        if self.max_seq_len > MAX_POSITIONS:  # the RoPE (or position) table is built whole: 32 GB at 10**9
            raise ComponentError(f"{key}.max_seq_len={self.max_seq_len:,} is past {MAX_POSITIONS:,} positions, the "
                                 "most data.seq_len takes. Fix: remove it (it follows data.seq_len), or a smaller "
                                 "number.")
        if self.num_layers > MAX_BLOCKS:  # each block is built, on the meta device too: 10**8 ran out of memory
            raise ComponentError(f"{key}.num_layers={self.num_layers:,} is past {MAX_BLOCKS:,} blocks (Llama 3.1 405B "
                                 f"has 126). Fix: a number of blocks up to {MAX_BLOCKS:,}.")
        if self.family not in FAMILIES:
            raise ComponentError(f"{key}.family={self.family!r}: use one of {sorted(FAMILIES)}.")
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ComponentError(
                f"{key}.embed_dim ({self.embed_dim}) must be divisible by {key}.num_heads "
                f"({self.num_heads}). Fix: change one of them."
            )
        if self.num_heads % self.num_kv_heads:
            raise ComponentError(
                f"{key}.num_heads ({self.num_heads}) must be a multiple of {key}.num_kv_heads "
                f"({self.num_kv_heads}). Fix: change one of them."
            )
        if self.family == "llama" and self.dim_per_head % 2:
            raise ComponentError(f"{key}: the head dim, {key}.embed_dim / {key}.num_heads = {self.dim_per_head}, must be "
                                 f"even for RoPE. Fix: choose {key}.embed_dim and {key}.num_heads so that it is.")
        if self.family == "gpt_neox" and (self.rotary_dim < 2 or self.rotary_dim % 2):
            raise ComponentError(f"{key}: RoPE turns {self.rotary_dim} of each head's {self.dim_per_head} features "
                                 f"(rotary_fraction={self.rotary_fraction}); it needs an even number >= 2.")
        if self.family in ("gpt_neox", "gpt2") and self.mlp_activation not in MLP_ACTIVATIONS:
            raise ComponentError(f"{key}.mlp_activation={self.mlp_activation!r}: use one of {sorted(MLP_ACTIVATIONS)}.")

    def _check_kinds(self, key: str) -> None:
        """Each field of the kind it must be: a count of 0, -1 or 1.5 failed inside torch (a
        division by zero, 'upper bound and lower bound inconsistent'), a size past 2**31 in
        torch's own size checks, a flag of 1 passed as true."""
        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIZE

        def positive(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")

        for name in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim",
                     "max_seq_len"):
            if not whole(getattr(self, name)):
                raise ComponentError(f"{key}.{name}={getattr(self, name)!r} must be an integer from 1 to {MAX_SIZE:,}. "
                                     f"Fix: set {key}.{name} to one.")
        if self.head_dim is not None and not whole(self.head_dim):
            raise ComponentError(f"{key}.head_dim={self.head_dim!r} must be an integer from 1 to {MAX_SIZE:,}, or null "
                                 f"(embed_dim / num_heads). Fix: set {key}.head_dim to one.")
        for name in ("rope_base", "norm_eps", "rotary_fraction"):
            if not positive(getattr(self, name)):
                raise ComponentError(f"{key}.{name}={getattr(self, name)!r} must be a finite number > 0. "
                                     f"Fix: set {key}.{name} to one.")
        scaling = self.rope_scaling or {}
        for name, value in scaling.items() if isinstance(scaling, dict) else [("", scaling)]:
            fits = (whole(value) if name == "original_max_position_embeddings" else
                    isinstance(value, list) and all(map(positive, value)) if name == "frequency_factors" else
                    positive(value))
            if not fits:
                raise ComponentError(f"{key}.rope_scaling{'.' + name if name else ''}={value!r} must be "
                                     + ("a list of numbers > 0" if name == "frequency_factors" else
                                        "a mapping of numbers" if not name else "a finite number > 0")
                                     + f". Fix: set {key}.rope_scaling as the model's config gives it.")
        for name in ("tie_word_embeddings", "qkv_bias", "output_bias", "qk_norm", "parallel_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ComponentError(f"{key}.{name}={getattr(self, name)!r} must be true or false. "
                                     f"Fix: set {key}.{name} to one.")

    @property
    def rotary_dim(self) -> int:
        """The features of each head that RoPE turns (all of them but in GPT-NeoX)."""
        return int(self.dim_per_head * self.rotary_fraction)


class FactoredRoPE(RotaryPositionalEmbeddings):
    """RoPE whose frequencies are each divided by a given factor: how llama.cpp stores
    Llama-3.1+'s scaled RoPE in a GGUF file (a ``rope_freqs`` tensor, one factor per pair),
    which gives the same frequencies as :class:`Llama3ScaledRoPE` from the factors alone."""

    def __init__(self, dim: int, max_seq_len: int, base: float, factors):
        self.factors = [float(f) for f in factors]
        super().__init__(dim=dim, max_seq_len=max_seq_len, base=base)

    def rope_init(self) -> None:
        theta = 1.0 / (self.base ** (torch.arange(0, self.dim, 2)[: self.dim // 2].float() / self.dim))
        self.register_buffer("theta", theta / torch.tensor(self.factors), persistent=False)
        self.build_rope_cache(self.max_seq_len)


def _rope(args: ModelArgs) -> nn.Module:
    if not args.rope_scaling:
        return RotaryPositionalEmbeddings(dim=args.dim_per_head, max_seq_len=args.max_seq_len, base=args.rope_base)
    s = args.rope_scaling
    if "frequency_factors" in s:  # from a GGUF file's rope_freqs
        return FactoredRoPE(args.dim_per_head, args.max_seq_len, args.rope_base, s["frequency_factors"])
    return Llama3ScaledRoPE(
        dim=args.dim_per_head, max_seq_len=args.max_seq_len, base=args.rope_base, scale_factor=s["factor"],
        low_freq_factor=s["low_freq_factor"], high_freq_factor=s["high_freq_factor"],
        old_context_len=s["original_max_position_embeddings"],
    )


class HeadNormedLinear(nn.Module):
    """A projection whose output is RMS-normalised head by head (Qwen3's q and k norms).

    torchtune's attention applies its ``q_norm``/``k_norm`` after RoPE, Qwen3 before it;
    with a learned scale the two differ, so the norm lives in the projection, which
    torchtune's attention calls before RoPE."""

    def __init__(self, linear: nn.Linear, head_dim: int, eps: float):
        super().__init__()
        self.linear, self.norm, self.head_dim = linear, RMSNorm(head_dim, eps=eps), head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x).unflatten(-1, (-1, self.head_dim))).flatten(-2)


def _attention(args: ModelArgs, pos_embeddings: Optional[nn.Module]) -> MultiHeadAttention:
    head_dim = args.dim_per_head

    def query_or_key(heads: int) -> nn.Module:
        linear = nn.Linear(args.embed_dim, heads * head_dim, bias=args.qkv_bias)
        return HeadNormedLinear(linear, head_dim, args.norm_eps) if args.qk_norm else linear

    return MultiHeadAttention(
        embed_dim=args.embed_dim,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=head_dim,
        q_proj=query_or_key(args.num_heads),
        k_proj=query_or_key(args.num_kv_heads),
        v_proj=nn.Linear(args.embed_dim, args.num_kv_heads * head_dim, bias=args.qkv_bias),
        output_proj=nn.Linear(args.num_heads * head_dim, args.embed_dim, bias=args.output_bias),
        pos_embeddings=pos_embeddings,
        max_seq_len=args.max_seq_len,
    )


def _decoder(args: ModelArgs, embeddings: nn.Embedding, layers: nn.ModuleList, norm: nn.Module) -> TransformerDecoder:
    if args.tie_word_embeddings:
        output = TiedLinear(embeddings)
    else:
        output = nn.Linear(args.embed_dim, args.vocab_size, bias=False)
    return TransformerDecoder(
        tok_embeddings=embeddings,
        layers=layers,
        max_seq_len=args.max_seq_len,
        num_heads=args.num_heads,
        head_dim=args.dim_per_head,
        norm=norm,
        output=output,
    )


def llama(args: ModelArgs) -> TransformerDecoder:
    """A Llama-family decoder, weights left as PyTorch initialises them.

    Call :func:`init_weights` for a from-scratch start (torchtune's builders have none).
    RoPE rotates interleaved pairs (torchtune's convention); Hugging Face checkpoints,
    which rotate halves, are permuted on load (``letrecipes.components.hf``).
    """
    args.validate()
    rope = _rope(args)
    layers = nn.ModuleList(
        TransformerSelfAttentionLayer(
            attn=_attention(args, rope),
            mlp=llama3_mlp(dim=args.embed_dim, hidden_dim=args.intermediate_dim),
            sa_norm=RMSNorm(args.embed_dim, eps=args.norm_eps),
            mlp_norm=RMSNorm(args.embed_dim, eps=args.norm_eps),
        )
        for _ in range(args.num_layers)
    )
    embeddings = nn.Embedding(args.vocab_size, args.embed_dim)
    return _decoder(args, embeddings, layers, RMSNorm(args.embed_dim, eps=args.norm_eps))


class TokenAndPositionEmbedding(nn.Embedding):
    """Token embedding plus a learned absolute position embedding (OPT, GPT-2).

    It is an ``nn.Embedding`` (its ``weight`` is the token table) so that weight tying,
    widths and vocabulary sizes read the same as for the Llama family. OPT's position
    table starts 2 rows in, a quirk of its original fairseq code; GPT-2's at row 0.
    """

    def __init__(self, vocab_size: int, embed_dim: int, max_seq_len: int, position_offset: int):
        super().__init__(vocab_size, embed_dim)
        self.position_offset = position_offset
        self.positions = nn.Embedding(max_seq_len + position_offset, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        where = torch.arange(tokens.shape[-1], device=tokens.device) + self.position_offset
        return super().forward(tokens) + self.positions(where)


POSITION_OFFSETS = {"opt": 2, "gpt2": 0}  # the rows before position 0 in each family's position table


def _absolute_positions_decoder(args: ModelArgs, activation: nn.Module) -> TransformerDecoder:
    """Pre-LayerNorm blocks over learned absolute positions, a two-matrix MLP with biases."""
    args.validate()

    def layer_norm() -> nn.LayerNorm:
        return nn.LayerNorm(args.embed_dim, eps=args.norm_eps)

    layers = nn.ModuleList(
        TransformerSelfAttentionLayer(
            attn=_attention(args, pos_embeddings=None),
            mlp=FeedForward(gate_proj=nn.Linear(args.embed_dim, args.intermediate_dim),
                            down_proj=nn.Linear(args.intermediate_dim, args.embed_dim), activation=activation),
            sa_norm=layer_norm(),
            mlp_norm=layer_norm(),
        )
        for _ in range(args.num_layers)
    )
    embeddings = TokenAndPositionEmbedding(args.vocab_size, args.embed_dim, args.max_seq_len,
                                           POSITION_OFFSETS[args.family])
    return _decoder(args, embeddings, layers, layer_norm())


def opt(args: ModelArgs) -> TransformerDecoder:
    """An OPT decoder (pre-LayerNorm variant, as in every OPT size except 350M): ReLU MLP."""
    return _absolute_positions_decoder(args, nn.ReLU())


def gpt2(args: ModelArgs) -> TransformerDecoder:
    """A GPT-2 decoder: OPT's layout with its positions from row 0 and a GELU MLP (GPT-2's
    ``gelu_new`` is the tanh form)."""
    return _absolute_positions_decoder(args, MLP_ACTIVATIONS[args.mlp_activation]())


class PartialRotaryEmbeddings(nn.Module):
    """RoPE over the first ``rotary_dim`` features of each head; the rest pass unturned
    (GPT-NeoX: Pythia turns a quarter of each head)."""

    def __init__(self, rotary_dim: int, max_seq_len: int, base: float):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.rope = RotaryPositionalEmbeddings(dim=rotary_dim, max_seq_len=max_seq_len, base=base)

    def rope_init(self) -> None:
        self.rope.rope_init()

    def forward(self, x: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        turned = self.rope(x[..., :self.rotary_dim], input_pos=input_pos)
        return torch.cat([turned, x[..., self.rotary_dim:]], dim=-1)


class ParallelResidualLayer(TransformerSelfAttentionLayer):
    """A block whose attention and MLP read the same input, their outputs added to it
    (GPT-NeoX's ``use_parallel_residual``, as in every Pythia); torchtune's layer chains them."""

    def forward(self, x: torch.Tensor, *, mask=None, input_pos: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        h = self.sa_norm(x)
        attn_out = self.attn(h, h, mask=mask, input_pos=input_pos)
        return x + self.sa_scale(attn_out) + self.mlp_scale(self.mlp(self.mlp_norm(x)))


MLP_ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


def gpt_neox(args: ModelArgs) -> TransformerDecoder:
    """A GPT-NeoX decoder (Pythia): LayerNorms, a GELU MLP with biases, RoPE over
    ``rotary_fraction`` of each head, attention and MLP in parallel or in sequence."""
    args.validate()
    rope = PartialRotaryEmbeddings(args.rotary_dim, args.max_seq_len, args.rope_base)
    block = ParallelResidualLayer if args.parallel_residual else TransformerSelfAttentionLayer

    def layer_norm() -> nn.LayerNorm:
        return nn.LayerNorm(args.embed_dim, eps=args.norm_eps)

    layers = nn.ModuleList(
        block(
            attn=_attention(args, rope),
            mlp=FeedForward(gate_proj=nn.Linear(args.embed_dim, args.intermediate_dim),
                            down_proj=nn.Linear(args.intermediate_dim, args.embed_dim),
                            activation=MLP_ACTIVATIONS[args.mlp_activation]()),
            sa_norm=layer_norm(),
            mlp_norm=layer_norm(),
        )
        for _ in range(args.num_layers)
    )
    return _decoder(args, nn.Embedding(args.vocab_size, args.embed_dim), layers, layer_norm())


FAMILIES = {"llama": llama, "opt": opt, "gpt2": gpt2, "gpt_neox": gpt_neox}


def rebuild_rope_caches(blocks: Iterable[nn.Module]) -> None:
    """Recompute RoPE caches (non-persistent buffers) on the default device.

    Needed after a model is built on meta and its weights assigned or materialised: the
    caches are not part of any state dict, so they are still on meta.
    """
    ropes = {id(b.attn.pos_embeddings): b.attn.pos_embeddings for b in blocks if b.attn.pos_embeddings is not None}
    for rope in ropes.values():
        rope.rope_init()


def decoder(args: ModelArgs) -> TransformerDecoder:
    """Build the decoder that ``args.family`` names (uninitialised)."""
    args.validate()
    return FAMILIES[args.family](args)


@torch.no_grad()
def init_weights(model: TransformerDecoder, std: float = 0.02) -> None:
    """From-scratch init: N(0, std) everywhere, residual-branch outputs scaled down.

    The attention output and the MLP down projection write into the residual stream;
    scaling them by 1/sqrt(2 * num_layers) keeps the stream's variance independent of
    depth (GPT-2 / Llama practice). Norm weights start at 1.
    """
    num_layers = len(model.layers)
    residual_std = std / math.sqrt(2 * num_layers)
    nn.init.normal_(model.tok_embeddings.weight, mean=0.0, std=std)
    if isinstance(model.output, nn.Linear):
        nn.init.normal_(model.output.weight, mean=0.0, std=std)
    for layer in model.layers:
        for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.mlp.w1, layer.mlp.w3):
            nn.init.normal_(proj.weight, mean=0.0, std=std)
        for proj in (layer.attn.output_proj, layer.mlp.w2):
            nn.init.normal_(proj.weight, mean=0.0, std=residual_std)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.scale)


def check_built_student(model: nn.Module, spec: Any) -> None:
    """What a ``model._component_`` must build, whoever wrote it: this module's decoder (a
    torchtune ``TransformerDecoder``) carrying its ``model_args``, which checkpoints, LET's
    choice of layers and the export read back. A model of another make (``nn.Sequential``,
    a transformers model) ended in an AttributeError traceback at the first check."""
    args = getattr(model, "model_args", None)
    if isinstance(model, TransformerDecoder) and isinstance(args, ModelArgs):
        return
    name = spec.get("_component_", spec) if hasattr(spec, "get") else spec  # the config's `model`: a name or a mapping
    what = type(model).__name__ + (" without model_args" if isinstance(model, TransformerDecoder) else "")
    raise ComponentError(f"model._component_={name} built a {what}; a student is the decoder "
                         "letrecipes.components.models builds (a torchtune TransformerDecoder carrying its ModelArgs "
                         "as model_args, which checkpoints, the layer map and the export read back). Fix: return "
                         "llama_model(...) or build_model(ModelArgs(...)) from your builder (docs/extending.md).")


def build_model(args: ModelArgs, init_std: Optional[float] = 0.02) -> TransformerDecoder:
    """Build and (unless ``init_std`` is None) initialise a decoder from scratch."""
    if init_std is not None and not (isinstance(init_std, (int, float)) and not isinstance(init_std, bool)
                                     and 0 < init_std < float("inf")):
        # 0 zeroes every weight, and no gradient reaches a network of zeros: the loss stayed at
        # ln(vocabulary) with grad_norm 0 for the whole run
        zero = init_std == 0 and not isinstance(init_std, bool)
        why = ": 0 makes every weight zero, and no gradient reaches a network of zeros" if zero else ""
        raise ComponentError(f"model.init_std={init_std!r} must be a finite number > 0 (0.02 is usual), or null for "
                             f"no initialisation (weights loaded afterwards){why}. Fix: set model.init_std to one, "
                             "like 0.02.")
    model = llama(args)
    if init_std is not None:
        init_weights(model, std=init_std)
    return model


def forward_with_hidden(
    model: TransformerDecoder,
    tokens: torch.Tensor,
    layers: Iterable[int] = (),
    logits: bool = True,
) -> Tuple[Dict[int, torch.Tensor], Optional[torch.Tensor]]:
    """Run ``model`` and return (hidden states at ``layers``, logits or None).

    Layers use the convention of this module's docstring. With ``logits=True`` the model
    runs through its own ``forward`` (so FSDP2's root hooks and per-block compile apply).
    With ``logits=False`` the forward stops at the deepest requested layer: a teacher that
    only supplies hidden states never pays for its output head or its unused top blocks.
    """
    wanted = set(layers)
    depth = len(model.layers)
    bad = [i for i in wanted if not 0 <= i <= depth]
    if bad:
        raise ValueError(f"layers {sorted(bad)} outside 0..{depth} for a {depth}-block model")
    hidden: Dict[int, torch.Tensor] = {}
    if logits:
        # torchtune's own capture records the input of block i, i.e. our layer i (< L);
        # the last layer (after the final norm) comes from a hook on the norm, which sits
        # outside any compiled block.
        inner = sorted(i for i in wanted if i < depth)
        handle = None
        if depth in wanted:
            handle = model.norm.register_forward_hook(lambda module, args, output: hidden.__setitem__(depth, output))
        previous, model.output_hidden_states = model.output_hidden_states, inner
        try:
            out = model(tokens)
        finally:
            model.output_hidden_states = previous
            if handle is not None:
                handle.remove()
        if inner:
            *states, out = out
            hidden.update(zip(inner, states))
        return hidden, out
    h = model.tok_embeddings(tokens)
    if 0 in wanted:
        hidden[0] = h
    for i in range(max(wanted, default=0)):
        h = model.layers[i](h)
        if i + 1 in wanted and i + 1 < depth:
            hidden[i + 1] = h
    if depth in wanted:
        hidden[depth] = model.norm(h)
    return hidden, None


def forward_with_loss(
    model: TransformerDecoder,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    layers: Iterable[int] = (),
    chunk_tokens: int = 0,
) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
    """(hidden states at ``layers``, mean NLL of ``labels``). With ``chunk_tokens`` > 0 the
    output layer and the loss run that many tokens at a time (components/loss.py) and the
    micro-batch's logits never exist whole.

    The loss replaces the model's ``unembed`` for the call, so it runs inside the model's own
    forward: FSDP2's root unit holds the output weight gathered there, exactly as when the
    logits come out of it.
    """
    if chunk_tokens <= 0:
        hidden, logits = forward_with_hidden(model, tokens, layers)
        return hidden, nll_loss(logits, labels)
    from letrecipes.components.loss import linear_cross_entropy, output_weight

    def unembed(h: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(model.norm(h), output_weight(model), labels, chunk_tokens)

    model.unembed = unembed
    try:
        return forward_with_hidden(model, tokens, layers)
    finally:
        del model.unembed


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; label -100 is ignored."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def model_max_seq_len(model_cfg, seq_len: int) -> int:
    """The positions a run's model holds: ``model.max_seq_len`` when set (it may exceed the
    training length: the export's ``max_position_embeddings``), else ``data.seq_len``."""
    max_seq_len = int(model_cfg.get("max_seq_len") or seq_len)
    if max_seq_len < seq_len:
        raise ComponentError(f"model.max_seq_len={max_seq_len} is shorter than data.seq_len={seq_len}, the length "
                             "the model trains on. Fix: remove model.max_seq_len (it then follows data.seq_len) or "
                             "raise it.")
    return max_seq_len


def padded_vocab_size(tokenizer_size: int, multiple: int = 64) -> int:
    """The embedding rows for a tokenizer: rounded up so the output matmul tiles well on GPUs."""
    return multiple * math.ceil(tokenizer_size / multiple)


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        total -= model.tok_embeddings.weight.numel()
    return total


def torchtune_builder_equivalent(factory) -> Optional[str]:
    """For ``model._component_`` naming one of torchtune's model builders (``llama3_2_1b``):
    the ``llama`` keys of the same shape as a one-line YAML mapping, read from the builder run
    on the meta device (milliseconds, nothing allocated); None when the builder needs
    arguments or its model is not Llama-shaped (biases, another attention or MLP)."""
    from torchtune.modules import FeedForward, MultiHeadAttention, RMSNorm, TransformerDecoder

    try:
        with torch.device("meta"):
            model = factory()
    except Exception:  # a builder that needs arguments (LoRA ranks, ...): no shape to read
        return None
    if not isinstance(model, TransformerDecoder) or not len(model.layers):
        return None
    layer = model.layers[0]
    attn, mlp = getattr(layer, "attn", None), getattr(layer, "mlp", None)
    if not (isinstance(attn, MultiHeadAttention) and isinstance(mlp, FeedForward) and mlp.w3 is not None
            and attn.q_proj.bias is None and isinstance(model.norm, RMSNorm)
            and attn.head_dim * attn.num_heads == attn.embed_dim):
        return None
    keys = {"num_layers": len(model.layers), "num_heads": attn.num_heads, "num_kv_heads": attn.num_kv_heads,
            "embed_dim": attn.embed_dim, "intermediate_dim": mlp.w1.out_features,
            "rope_base": getattr(attn.pos_embeddings, "base", 10_000), "norm_eps": model.norm.eps,
            "tie_word_embeddings": str(not isinstance(model.output, nn.Linear)).lower()}
    if isinstance(attn.pos_embeddings, Llama3ScaledRoPE):  # Llama 3.1+: the four numbers its config states
        rope = attn.pos_embeddings
        keys["rope_scaling"] = (f"{{factor: {rope.scale_factor}, low_freq_factor: {rope.low_freq_factor}, "
                                f"high_freq_factor: {rope.high_freq_factor}, "
                                f"original_max_position_embeddings: {rope.old_context_len}}}")
    return "{_component_: llama, " + ", ".join(f"{k}: {v}" for k, v in keys.items()) + "}"


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@register("model", "llama")
def llama_model(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    max_seq_len: int,
    num_kv_heads: Optional[int] = None,
    intermediate_dim: Optional[int] = None,
    rope_base: float = 10_000.0,
    norm_eps: float = 1e-5,
    tie_word_embeddings: bool = True,
    init_std: Optional[float] = 0.02,
    rope_scaling: Optional[dict] = None,
) -> TransformerDecoder:
    """Config entry point (``model: {_component_: llama, ...}``).

    ``intermediate_dim`` defaults to the Llama SwiGLU width (8/3 * embed_dim, rounded up
    to a multiple of 64). ``rope_scaling`` is Llama 3.1+'s scaled RoPE, in its Hugging Face
    keys (``{factor: 32, low_freq_factor: 1, high_freq_factor: 4,
    original_max_position_embeddings: 8192}``); the export writes it to ``config.json``.
    The returned model carries its :class:`ModelArgs` as ``model.model_args`` so that
    checkpoints can rebuild it.
    """
    if intermediate_dim is None:
        intermediate_dim = 64 * math.ceil(8 * embed_dim / 3 / 64)
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        rope_scaling.pop("rope_type", None)  # as a Hugging Face config writes it
        if sorted(rope_scaling) != sorted(ROPE_SCALING_KEYS):
            raise ComponentError(f"model.rope_scaling has the keys {sorted(rope_scaling)}; Llama 3.1's scaled RoPE "
                                 f"takes exactly {list(ROPE_SCALING_KEYS)}. Fix: give all four, as a Hugging Face "
                                 "config's rope_scaling has them (Llama-3.2-1B's {factor: 32, low_freq_factor: 1, "
                                 "high_freq_factor: 4, original_max_position_embeddings: 8192}), or null for plain "
                                 "RoPE.")
    args = ModelArgs(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads or num_heads, embed_dim=embed_dim, intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len, rope_base=rope_base, norm_eps=norm_eps, tie_word_embeddings=tie_word_embeddings,
        rope_scaling=rope_scaling,
    )
    model = build_model(args, init_std=init_std)
    model.model_args = args
    return model
