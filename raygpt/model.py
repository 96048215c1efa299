"""The GPT-2 architecture, as in "Build a Large Language Model (from Scratch)" and nanoGPT.

Token + learned position embeddings, pre-LayerNorm transformer blocks (causal multi-head
attention, GELU-tanh MLP), a final LayerNorm and a linear head. Parameter names follow
OpenAI's GPT-2 checkpoints (wte, wpe, h.N.attn.c_attn, ...) so importing their weights is a
rename-free mapping (see ``raygpt.hf``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from raygpt.errors import RaygptError

# GPT-2's BPE (tiktoken's "gpt2"): its vocabulary size and the id of <|endoftext|>. Written out
# here rather than imported from raygpt.tokenizer, so that the model does not load tiktoken.
VOCAB_SIZE = 50257
EOT_ID = 50256
IGNORE_INDEX = -100  # a target that counts for nothing, as in F.cross_entropy
# Rows of the loss at a time: one chunk's float32 logits live at once (0.8 GB at GPT-2's vocabulary).
LOSS_CHUNK_ROWS = 4096


@dataclass
class GPTConfig:
    vocab_size: int = VOCAB_SIZE
    """Token vocabulary (GPT-2's BPE: 50257)."""
    context_length: int = 1024
    """Longest sequence the position embedding covers."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads per block; ``n_embd`` must be divisible by it."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches."""
    qkv_bias: bool = False
    """Bias on the fused query/key/value projection (OpenAI's GPT-2 has one)."""
    tie_weights: bool = False
    """Output head shares the token embedding matrix (OpenAI's GPT-2 does)."""
    vocab_multiple: int = 1
    """Round the rows of the token embedding and the head up to a multiple of this (64: 50257
    -> 50304), for faster matmuls on GPUs. The padding rows are never predicted. 1, the
    default and what a saved config without this field means, pads nothing."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.vocab_multiple < 1:
            raise ValueError(f"vocab_multiple={self.vocab_multiple} must be at least 1")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of ``wte`` and ``lm_head``: ``vocab_size`` rounded up to ``vocab_multiple``."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


# Architecture presets. The GPT-2 family uses context 1024; the small presets keep tests and
# the quickstart fast on a CPU.
PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    "nano": GPTConfig(n_layer=4, n_head=4, n_embd=128, context_length=256),
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=32, context_length=64),
}


# What a run spec's ``model.vocab_multiple: null`` means for a new run: 50257 -> 50304 rows, whose
# matmuls are 5.5% faster on GPUs (and no slower on CPUs). A saved GPTConfig without the field
# still means 1.
DEFAULT_VOCAB_MULTIPLE = 64


def config_from_spec(model_spec, trained: GPTConfig | None = None) -> GPTConfig:
    """A ``GPTConfig`` from a run spec's ``model`` section (preset plus overrides). ``trained``:
    the config of the checkpoint a run resumes from, whose padding a spec without
    ``vocab_multiple`` keeps."""
    if model_spec.preset not in PRESETS:
        raise RaygptError(f"model.preset: unknown preset {model_spec.preset!r} (known: {', '.join(PRESETS)})")
    vocab_multiple = model_spec.vocab_multiple
    if vocab_multiple is None:
        vocab_multiple = trained.vocab_multiple if trained is not None else DEFAULT_VOCAB_MULTIPLE
    overrides = dict(dropout=model_spec.dropout, qkv_bias=model_spec.qkv_bias, tie_weights=model_spec.tie_weights,
                     vocab_multiple=vocab_multiple)
    if model_spec.context_length is not None:
        overrides["context_length"] = model_spec.context_length
    return replace(PRESETS[model_spec.preset], **overrides)


def pick_next_tokens(logits: torch.Tensor, temperature: float, top_k: int | None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` (B, vocab) -> (B,): greedy at temperature 0,
    else sampled from the softmax at ``temperature`` over the ``top_k`` most likely only."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


class KVCache:
    """Keys and values of one attention layer for incremental decoding: (B, nh, T_max, hs)."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # query, key and value projections for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache: KVCache | None = None, cache_start: int = 0, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(cache_start, k, v)  # (B, nh, S, hs), S = cache_start + T
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            # flash / memory-efficient kernels on GPU
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, cache_start=0, mask=None):
        x = x + self.attn(self.ln_1(x), cache, cache_start, mask)
        return x + self.mlp(self.ln_2(x))


def chunked_cross_entropy(hidden, weight, targets, vocab_size: int | None = None,
                          chunk_size: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)``, the mean over targets that are not -100,
    without the (N, V) logits: rows go ``chunk_size`` at a time, each chunk's logits made in the
    matmul dtype (autocast's) and upcast to float32 for the softmax. hidden (N, C), weight
    (V, C), targets (N,). Logit columns from ``vocab_size`` on (a padded head's) are -inf."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, vocab_size, chunk_size)
    return _linear_cross_entropy(hidden, weight, targets, vocab_size, chunk_size, with_grads=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """Computes the gradients in the forward pass, chunk by chunk, while each chunk's softmax is
    at hand; backward only scales them. Recomputing each chunk in backward (torch.utils.checkpoint)
    would cost a fourth head matmul: a quarter more step time at small widths, where the head
    dominates. The price: d loss/d weight (one head's size) is held from forward to backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, chunk_size):
        loss, grad_hidden, grad_weight = _linear_cross_entropy(hidden, weight, targets, vocab_size, chunk_size, True)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


# The head's rows are padded to a multiple of this inside the loss. The logits' rows are then a
# multiple of 128 bytes long in bf16, which cuBLAS's Hopper kernels need: at GPT-2's 50,257 the
# three head matmuls fell back to sm75 kernels (aligned to one element), 40% of an eager step.
HEAD_ROW_ALIGNMENT = 64


def _matmul_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would run a matmul of ``dtype`` tensors in."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


def _linear_cross_entropy(hidden, weight, targets, vocab_size, chunk_size, with_grads: bool):
    """(loss, d loss/d hidden, d loss/d weight); the gradients are None unless ``with_grads``.

    The weight is cast to the matmul dtype once, with zero rows up to ``HEAD_ROW_ALIGNMENT``
    (one copy, which autocast's cast of the head made anyway); their columns are -inf, as a
    padded head's are, so their softmax and gradients are zero."""
    rows, width = weight.shape
    vocab = vocab_size or rows
    dtype = _matmul_dtype(hidden.device.type, weight.dtype)
    aligned_rows = -(-rows // HEAD_ROW_ALIGNMENT) * HEAD_ROW_ALIGNMENT
    if aligned_rows == rows:
        head = weight.detach().to(dtype)
    else:
        head = weight.new_zeros(aligned_rows, width, dtype=dtype)
        head[:rows] = weight.detach()
    valid = targets != IGNORE_INDEX  # (N,)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if with_grads else None
    grad_head = torch.zeros(aligned_rows, width, dtype=torch.float32, device=weight.device) if with_grads else None
    for start in range(0, hidden.size(0), chunk_size):
        chunk = slice(start, start + chunk_size)
        h, t, keep = hidden[chunk].detach().to(dtype), targets[chunk].clamp(min=0), valid[chunk]  # (n, C), (n,), (n,)
        logits = F.linear(h, head).float()  # (n, aligned_rows)
        logits[:, vocab:] = float("-inf")
        lse = logits.logsumexp(dim=1)  # (n,)
        loss += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * keep).sum()
        if with_grads:
            # d(lse - logit[t]) / d logits = softmax - one_hot(t); nothing for ignored rows, whose
            # shift is +inf (softmax 0) and whose one-hot is scaled by keep (0).
            shift = torch.where(keep, lse, float("inf"))
            into = logits if dtype == logits.dtype else torch.empty_like(logits, dtype=dtype)  # in place in fp32
            grad_logits = torch.exp(logits.sub_(shift[:, None]), out=into)
            grad_logits[torch.arange(len(t), device=t.device), t] -= keep.to(dtype)
            grad_hidden[chunk] = grad_logits @ head
            grad_head += grad_logits.t() @ h
    count = valid.sum()  # a tensor, so no host sync
    if not with_grads:
        return loss / count, None, None
    return loss / count, grad_hidden / count, grad_head[:rows] / count


def parameter_seed(seed: int, name: str) -> int:
    """The seed of one parameter's initial values: a function of the run's seed and the
    parameter's name alone, so no other parameter's presence changes it."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, seed: int | None = None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.context_length, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        if not self.lm_head.weight.is_meta:  # a model of shapes only draws nothing
            # Without a seed, one is drawn from torch's generator: torch.manual_seed still decides.
            self.init_weights(seed if seed is not None else int(torch.randint(2**62, (), device="cpu")))

    def init_plan(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """How each parameter starts, by name: (shape, rule), the rule ``normal(std)``,
        ``zeros`` or ``ones``. GPT-2's: normal(0.02) for weights and embeddings, scaled by
        1/sqrt(2 * n_layer) for the residual projections (one per sublayer), zero biases, unit
        LayerNorm gains. Tied weights are one parameter, the token embedding."""
        plan = {}
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                rule = f"normal({0.02 / math.sqrt(2 * self.config.n_layer)!r})"
            elif name.endswith(".bias"):
                rule = "zeros"
            elif p.dim() == 1:  # LayerNorm gains
                rule = "ones"
            else:
                rule = "normal(0.02)"
            plan[name] = (tuple(p.shape), rule)
        return plan

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Draw every parameter by ``init_plan``, each from a generator of its own seeded by
        ``seed`` and the parameter's name (``parameter_seed``), on the CPU whatever the device.
        Two models built with one seed therefore start equal in every parameter whose name and
        plan they share, whatever else differs (a QKV bias, tied weights, dropout, the device):
        the paired design of an ablation sweep (``raygpt.sweep``)."""
        parameters = dict(self.named_parameters())
        for name, (shape, rule) in self.init_plan().items():
            p = parameters[name]
            if rule == "zeros":
                p.zero_()
            elif rule == "ones":
                p.fill_(1.0)
            else:
                std = float(rule[len("normal("):-1])
                generator = torch.Generator().manual_seed(parameter_seed(seed, name))
                p.copy_(torch.randn(shape, generator=generator).mul_(std))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters of the model without vocabulary padding, tied ones counted once.
        ``non_embedding`` leaves out the position embedding (and the token embedding unless it
        doubles as the head), as in the Kaplan/Chinchilla FLOP counts."""
        c = self.config
        n = sum(p.numel() for p in self.parameters())  # parameters() yields tied tensors once
        n -= (c.padded_vocab_size - c.vocab_size) * c.n_embd * (1 if c.tie_weights else 2)
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
            if not c.tie_weights:
                n -= c.vocab_size * c.n_embd
        return n

    def unpadded_state_dict(self) -> dict[str, torch.Tensor]:
        """``state_dict()`` with ``wte`` and ``lm_head`` cut to ``vocab_size`` rows (views, not
        copies): the weights of this model built with ``vocab_multiple=1``, as exports need."""
        vocab = slice(0, self.config.vocab_size)
        return {name: tensor[vocab] if name in ("transformer.wte.weight", "lm_head.weight") else tensor
                for name, tensor in self.state_dict().items()}

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6 per weight, plus attention's
        12 * n_layer * n_embd * seq_len (PaLM appendix B). Used for MFU."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * seq_len

    def forward(self, idx, targets=None, *, caches: list[KVCache] | None = None, cache_start: int = 0,
                positions=None, mask=None):
        """``(logits, None)`` without ``targets``, logits (B, T, vocab_size); with them,
        ``(None, loss)``: the mean cross-entropy over targets that are not -100, for which no
        (B, T, vocab) tensor is made. ``caches``/``positions``/``mask`` serve incremental decoding."""
        B, T = idx.size()
        if T > self.config.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds the context length {self.config.context_length}")
        if positions is None:
            positions = torch.arange(cache_start, cache_start + T, device=idx.device)
        tok_emb = self.transformer.wte(idx)  # (B, T, n_embd)
        pos_emb = self.transformer.wpe(positions)  # (T, n_embd) or (B, T, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches else None, cache_start, mask)
        x = self.transformer.ln_f(x)  # (B, T, n_embd)
        if targets is not None:
            # Full float32 logits would be the largest tensor of the step (3.3 GB for 16 x 1024 tokens).
            loss = chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                         self.config.vocab_size)
            return None, loss
        logits = self.lm_head(x)  # (B, T, padded vocab)
        return logits[..., :self.config.vocab_size], None

    def configure_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float],
                            device_type: str) -> torch.optim.AdamW:
        """AdamW that decays 2-D weights (matmuls, embeddings) but not biases or LayerNorms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel is CUDA-only; the for-each one is the fast path elsewhere.
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, eos_id: int | None = EOT_ID,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Continue each prompt by up to ``max_new_tokens`` tokens, in one batch, with a KV cache.

        Greedy at temperature 0, else sampled (optionally from the top k). A sequence stops at
        ``eos_id``, which is not returned. Prompts of different lengths are left-padded and
        masked, with positions counted from each prompt's first real token, so a prompt gets
        the same continuation alone or in a batch. Prompts longer than the context allows are
        cut from the left. Returns the new tokens of each prompt.
        """
        if not prompts or max_new_tokens <= 0:
            return [[] for _ in prompts]
        was_training = self.training
        self.eval()
        device = self.lm_head.weight.device
        ctx = self.config.context_length
        max_new_tokens = min(max_new_tokens, ctx - 1)
        prompts = [p[-(ctx - max_new_tokens):] or [eos_id or 0] for p in prompts]
        B, L = len(prompts), max(len(p) for p in prompts)
        total = L + max_new_tokens

        idx = torch.zeros(B, L, dtype=torch.long, device=device)
        key_valid = torch.ones(B, total, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            idx[b, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            key_valid[b, :L - len(p)] = False
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        positions = (key_valid[:, :L].long().cumsum(1) - 1).clamp(min=0)  # (B, L)

        c = self.config
        dtype = self.lm_head.weight.dtype
        caches = [KVCache(B, c.n_head, total, c.n_embd // c.n_head, device, dtype) for _ in range(c.n_layer)]
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        # A padding query may only see itself: a row with no visible key would make NaNs.
        mask = (causal & key_valid[:, None, None, :L]) | torch.eye(L, dtype=torch.bool, device=device)
        logits, _ = self(idx, caches=caches, positions=positions, mask=mask)
        logits = logits[:, -1, :]

        out = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new_tokens):
            next_id = pick_next_tokens(logits, temperature, top_k, generator)  # (B,)
            for b, token in enumerate(next_id.tolist()):  # one device-to-host copy per step
                if not done[b]:
                    if token == eos_id:
                        done[b] = True
                    else:
                        out[b].append(token)
            if all(done) or step == max_new_tokens - 1:
                break
            start = L + step
            mask = key_valid[:, None, None, :start + 1]
            logits, _ = self(next_id[:, None], caches=caches, cache_start=start,
                             positions=(lengths + step)[:, None], mask=mask)
            logits = logits[:, -1, :]
        self.train(was_training)
        return out
