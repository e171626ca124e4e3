"""The frozen trunk of a top-N-blocks model, run once per sequence.

When only the top N decoder blocks (+ final norm + head) train, the embeddings and the blocks
below them compute the same output for a sequence in every epoch, and on a CPU they are most of
the cost. `FrozenTrunkCache` keeps that output per distinct token sequence, built in one pass
over the data before training (the replies to one prompt share the prompt's computation) or the
first time a sequence is seen, and `run_blocks` runs the remaining blocks on it exactly as the
model's own forward would (Llama-style decoders: `embed_tokens`, `layers`, `norm`, `rotary_emb`).
"""

import hashlib
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from lit_rlhf.artifacts import save_file_atomically
from lit_rlhf.errors import reason
from lit_rlhf.text import pad_sequences

_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def unsupported_reason(model: nn.Module, n_frozen: int) -> str | None:
    """Why the frozen-trunk cache cannot serve `model` with `n_frozen` frozen blocks (None: it can)."""
    backbone = model.base_model
    if n_frozen < 1:
        return "no frozen block"
    if not all(hasattr(backbone, part) for part in _PARTS) or not hasattr(model, "score"):
        return f"{type(model).__name__} is not a Llama-style decoder ({', '.join(_PARTS)}) with a `score` head"
    trunk = [backbone.embed_tokens, *backbone.layers[:n_frozen]]
    dropout = [m.p for part in trunk for m in part.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if dropout or getattr(backbone.config, "attention_dropout", 0.0) > 0:
        return "the frozen blocks use dropout, so their output differs between epochs"
    return None


def run_blocks(
    backbone: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, blocks, cache: DynamicCache | None = None
) -> torch.Tensor:
    """`blocks` on `hidden` ([B, T, H], right-padded), called as LlamaModel.forward calls its layers:
    the same causal + padding mask and rotary position embeddings. Without `cache`, positions are
    0..T-1; with one (keys/values of a shared prefix of length P, which `attention_mask` [B, P + T]
    covers too), they are P..P+T-1 and the blocks append their keys/values to it."""
    layer = blocks[0].self_attn.layer_idx  # the cache holds the layers of `blocks` only, from this index on
    past = cache.get_seq_length(layer) if cache is not None else 0
    position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(
        config=backbone.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
        layer_idx=layer,
    )
    position_embeddings = backbone.rotary_emb(hidden, position_ids=position_ids)
    for block in blocks:
        hidden = block(
            hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids, cache=cache
        )
    return hidden


def run_blocks_sharing_prompts(
    backbone: nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_tokens: torch.Tensor,
    blocks,
) -> torch.Tensor:
    """`run_blocks`, but rows that start with the same prompt (its first `prompt_tokens` ids) run it
    once: the prompt through the blocks with its keys/values kept, then all their continuations on
    top of it (gradients flow back through the shared keys/values). Other rows run as one batch."""
    groups: dict[tuple, list[int]] = {}
    for row, length in enumerate(prompt_tokens.tolist()):
        groups.setdefault(tuple(input_ids[row, :length].tolist()), []).append(row)
    lengths = attention_mask.sum(-1).tolist()
    shared = {prompt: rows for prompt, rows in groups.items() if prompt and len(rows) > 1}
    alone = [row for prompt, rows in groups.items() if prompt not in shared for row in rows]
    parts: list[tuple[list[int], torch.Tensor]] = []
    if alone:
        width = max(lengths[row] for row in alone)
        parts.append((alone, run_blocks(backbone, hidden[alone, :width], attention_mask[alone, :width], blocks)))
    for prompt, rows in shared.items():
        start, width = len(prompt), max(lengths[row] for row in rows)
        cache = DynamicCache(config=backbone.config)
        head = run_blocks(backbone, hidden[rows[:1], :start], attention_mask[rows[:1], :start], blocks, cache)
        cache.batch_repeat_interleave(len(rows))
        tail = run_blocks(backbone, hidden[rows, start:width], attention_mask[rows, :width], blocks, cache)
        parts.append((rows, torch.cat([head.expand(len(rows), -1, -1), tail], dim=1)))
    order = torch.tensor([row for rows, _ in parts for row in rows]).argsort()
    width = hidden.shape[1]
    padded = [nn.functional.pad(out, (0, 0, 0, width - out.shape[1])) for _, out in parts]
    return torch.cat(padded)[order.to(hidden.device)]


def last_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The rightmost non-pad position of each row, as HF's *ForSequenceClassification reads it."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def sequence_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """One key per row: a hash of its unpadded token ids (the cache's per-sequence key)."""
    lengths = attention_mask.sum(-1).tolist()
    rows = input_ids.cpu().numpy()
    return [hashlib.blake2b(rows[i, :n].tobytes(), digest_size=16).hexdigest() for i, n in enumerate(lengths)]


def unique_rows(keys: list[str]) -> tuple[list[int], torch.Tensor]:
    """(first row of each distinct key, index of each row's key among them): a sequence that is in
    several pairs of a batch is computed once."""
    index: dict[str, int] = {}
    rows, inverse = [], []
    for row, key in enumerate(keys):
        if key not in index:
            index[key] = len(rows)
            rows.append(row)
        inverse.append(index[key])
    return rows, torch.tensor(inverse)


def trunk_description(backbone: nn.Module, n_frozen: int, precision: str) -> dict[str, str]:
    """What the trunk's output depends on: its weights and structure (hashed), how many blocks it
    has, the attention implementation and the numeric precision."""
    digest = hashlib.blake2b(digest_size=16)
    for module in (backbone.embed_tokens, backbone.rotary_emb, *backbone.layers[:n_frozen]):
        digest.update(repr(module).encode())
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
        digest.update(repr(getattr(module, "attention_scaling", None)).encode())
    return {
        "model": digest.hexdigest(),
        "frozen_blocks": str(n_frozen),
        "attention": str(backbone.config._attn_implementation),
        "precision": precision,
    }


class FrozenTrunkCache:
    """Output of the embeddings + bottom `n_frozen` blocks per distinct token sequence.

    In memory, and on disk at `path` (safetensors, one tensor per sequence, written to a temporary
    file and renamed, so an interrupted or failed write leaves no file a later run would trust). A
    file is reused only when it was built for the same trunk (weights, number of blocks, attention,
    precision); entries are keyed by the sequence's token ids, so another tokenizer, max_length or
    data set simply finds other keys. Mismatches are printed, never silently reused.
    """

    def __init__(self, backbone: nn.Module, n_frozen: int, path: Path | None = None, precision: str = "32-true"):
        self.backbone, self.n_frozen, self.path = backbone, n_frozen, path
        self.description = trunk_description(backbone, n_frozen, precision)
        self.entries: dict[str, torch.Tensor] = {}
        self.stored = None
        self.stored_keys: set[str] = set()
        self.computed = self.reused = 0
        self.dirty = False
        if path is not None:
            self._open(path)

    def _open(self, path: Path) -> None:
        if not path.exists():
            print(f"[lit_rlhf] frozen-trunk cache: no {path} yet, building it")
            return
        try:
            stored = safe_open(str(path), framework="pt")
            metadata = stored.metadata() or {}
        except Exception as error:  # safetensors raises its own types for truncated/corrupt files
            print(f"[lit_rlhf] frozen-trunk cache {path} is unreadable ({reason(error)}): rebuilding it")
            return
        differs = [
            f"{key} {metadata.get(key)} -> {value}"
            for key, value in self.description.items()
            if metadata.get(key) != value
        ]
        if differs:
            print(
                f"[lit_rlhf] frozen-trunk cache {path} was built for another trunk ({'; '.join(differs)}): "
                "rebuilding it"
            )
            return
        self.stored, self.stored_keys = stored, set(stored.keys())
        print(f"[lit_rlhf] frozen-trunk cache: {len(self.stored_keys)} sequences in {path}")

    def _get(self, key: str) -> torch.Tensor:
        if key not in self.entries:
            self.entries[key] = self.stored.get_tensor(key)
        return self.entries[key]

    @torch.no_grad()
    def build(self, loaders, progress_every_s: float = 60.0, save_every_s: float = 600.0) -> None:
        """Compute every sequence of the loaders' batches that the cache lacks, before training.

        The sequences are grouped by prompt (the batch's `prompt_tokens`): each prompt runs once
        through the trunk, its replies continue from its keys/values, so a prompt with k replies
        costs one prompt instead of k. The file is written every `save_every_s`, so an interrupted
        build resumes where it stopped.
        """
        groups: dict[tuple, dict[str, torch.Tensor]] = {}
        for loader in loaders:
            for batch in loader:
                keys = sequence_keys(batch["input_ids"], batch["attention_mask"])
                for row, (key, length) in enumerate(zip(keys, batch["attention_mask"].sum(-1).tolist())):
                    if key in self.entries or key in self.stored_keys:
                        continue
                    ids = batch["input_ids"][row, :length]
                    prompt = int(batch["prompt_tokens"][row]) if "prompt_tokens" in batch else 0
                    groups.setdefault(tuple(ids[:prompt].tolist()), {})[key] = ids[prompt:]
        total = sum(len(p) + sum(len(r) for r in replies.values()) for p, replies in groups.items())
        if not total:
            return
        started = last_report = last_save = time.perf_counter()
        done, estimated = 0, False
        reuse = f"; kept in {self.path} for later runs" if self.path else ""
        print(
            f"[lit_rlhf] frozen-trunk cache: computing {sum(map(len, groups.values()))} sequences "
            f"({len(groups)} prompts, {total} tokens with each prompt once): every pair of the train and "
            f"validation splits, whatever --trainer.max_steps or limit_train_batches{reuse}"
        )
        for prompt, replies in groups.items():
            self._compute_group(torch.tensor(prompt, dtype=torch.long), replies)
            done += len(prompt) + sum(len(r) for r in replies.values())
            if not estimated and time.perf_counter() - started > 10:  # the cost before it is paid
                estimated = True
                rate = done / (time.perf_counter() - started)
                print(
                    f"[lit_rlhf] frozen-trunk cache: about {(total - done) / rate / 60:.1f} min to go "
                    f"({rate:.0f} tokens/s)",
                    flush=True,
                )
            if time.perf_counter() - last_report > progress_every_s:
                last_report = time.perf_counter()
                print(
                    f"[lit_rlhf] frozen-trunk cache: {done}/{total} tokens, {last_report - started:.0f} s", flush=True
                )
            if time.perf_counter() - last_save > save_every_s:
                self.save()
                last_save = time.perf_counter()
        print(f"[lit_rlhf] frozen-trunk cache: {total} tokens in {time.perf_counter() - started:.0f} s")

    def _compute_group(self, prompt: torch.Tensor, replies: dict[str, torch.Tensor]) -> None:
        """The prompt once (its keys/values kept), then all its replies on top of it in one batch."""
        device = self.backbone.embed_tokens.weight.device
        blocks = self.backbone.layers[: self.n_frozen]
        if len(prompt) == 0:
            keys, rows = list(replies), list(replies.values())
            # pad id 0: the padded columns are masked, and cut before anything is stored
            input_ids, attention_mask = pad_sequences(rows, 0, side="right", device=device)
            self._compute(keys, input_ids, attention_mask)
            return
        cache = DynamicCache(config=self.backbone.config)
        prompt = prompt.to(device)[None]
        prompt_hidden = run_blocks(
            self.backbone, self.backbone.embed_tokens(prompt), torch.ones_like(prompt), blocks, cache
        )[0]
        cache.batch_repeat_interleave(len(replies))
        input_ids, reply_mask = pad_sequences(list(replies.values()), 0, side="right", device=device)
        attention_mask = torch.cat([reply_mask.new_ones(len(replies), prompt.shape[1]), reply_mask], dim=1)
        hidden = run_blocks(self.backbone, self.backbone.embed_tokens(input_ids), attention_mask, blocks, cache)
        for row, (key, length) in enumerate(zip(replies, reply_mask.sum(-1).tolist())):
            self.entries[key] = torch.cat([prompt_hidden, hidden[row, :length]]).to("cpu")
        self.computed += len(replies)
        self.dirty = True

    @torch.no_grad()
    def _compute(self, keys: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        width = int(attention_mask.sum(-1).max())
        input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
        hidden = self.backbone.embed_tokens(input_ids)
        hidden = run_blocks(self.backbone, hidden, attention_mask, self.backbone.layers[: self.n_frozen])
        for row, (key, length) in enumerate(zip(keys, attention_mask.sum(-1).tolist())):
            self.entries[key] = hidden[row, :length].to("cpu", copy=True)
        self.computed += len(keys)
        self.dirty = True

    def hidden(self, keys: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The trunk's output for a right-padded batch ([B, T, H], zeros at padding; no gradient)."""
        missing = [row for row, key in enumerate(keys) if key not in self.entries and key not in self.stored_keys]
        if missing:
            self._compute([keys[row] for row in missing], input_ids[missing], attention_mask[missing])
        self.reused += len(keys) - len(missing)
        values = [self._get(key) for key in keys]
        # a fresh tensor: entries made under inference mode (validation) must not reach autograd
        out = torch.zeros(len(keys), input_ids.shape[1], values[0].shape[-1], dtype=values[0].dtype)
        for row, value in enumerate(values):
            out[row, : len(value)] = value
        return out.to(input_ids.device)

    def save(self) -> None:
        """Write every sequence held (read + new) to `path` when new ones were computed."""
        if self.path is None or not self.dirty:
            return
        tensors = {key: self._get(key) for key in self.stored_keys | set(self.entries)}
        try:
            save_file_atomically(
                self.path, lambda temporary: save_file(tensors, str(temporary), metadata=self.description)
            )
        except OSError as error:  # a full disk, a read-only folder: the run goes on without a file
            print(
                f"[lit_rlhf] could not write the frozen-trunk cache {self.path} ({reason(error)}); "
                "training goes on, a later run builds it again"
            )
            return
        self.stored, self.stored_keys, self.dirty = None, set(), False
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        print(
            f"[lit_rlhf] frozen-trunk cache: {len(tensors)} sequences ({size / 2**30:.2f} GiB) written to "
            f"{self.path} ({self.computed} computed, {self.reused} reads from the cache so far)"
        )
