"""Batched, seeded generation from chat prompts (the same decoding for every compared model)."""

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from lit_rlhf.text import batches_by_length, chat_prompt_ids, pad_sequences


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 16,
    max_prompt_length: int = 256,
    desc: str = "generating",
    return_logprobs: bool = False,
    system_prompt: str | None = None,
):
    """(texts, token ids up to the first EOS) per prompt; sampling with top_k=0, top_p=1 from `seed`.

    A prompt is a user text or a conversation (`[{"role", "content"}, ...]`, see `chat_prompt_ids`).
    `return_logprobs`: also each kept token's log-prob under logits / temperature, the distribution
    it was sampled from (what `response_logprobs` recomputes, without a second forward pass).
    `system_prompt`: the system turn in front of every prompt (`chat_prompt_ids`).
    """
    model.eval()
    device = next(model.parameters()).device
    config = GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_logits=return_logprobs,
    )
    encoded = [chat_prompt_ids(tokenizer, p, max_prompt_length, system_prompt)[0] for p in prompts]
    texts, token_ids, logprobs = [None] * len(prompts), [None] * len(prompts), [None] * len(prompts)
    torch.manual_seed(seed)  # the batches' order depends on the prompts alone: every model draws alike
    for batch in tqdm(batches_by_length([len(ids) for ids in encoded], batch_size), desc=desc, leave=False):
        input_ids, attention = pad_sequences(
            [encoded[i] for i in batch], tokenizer.pad_token_id, side="left", device=device
        )
        width = input_ids.size(1)
        out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        sampled = out.sequences[:, width:]
        if return_logprobs:
            logits = torch.stack(out.logits, dim=1).float() / (temperature if temperature > 0 else 1.0)
            chosen = torch.log_softmax(logits, dim=-1).gather(2, sampled.unsqueeze(-1)).squeeze(-1).cpu()
        for j, (i, row) in enumerate(zip(batch, sampled.tolist())):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            token_ids[i], texts[i] = row, tokenizer.decode(row, skip_special_tokens=True).strip()
            if return_logprobs:
                logprobs[i] = chosen[j, : len(row)]
    return (texts, token_ids, logprobs) if return_logprobs else (texts, token_ids)


def is_truncated(token_ids: list[int], max_new_tokens: int) -> bool:
    """Whether a response of `generate_responses` was cut off: it holds ids up to its first EOS, so
    only a response that found no EOS within `max_new_tokens` is that long."""
    return len(token_ids) >= max_new_tokens


@torch.no_grad()
def response_logprobs(
    model,
    tokenizer,
    prompts: list,
    token_ids: list[list[int]],
    temperature: float,
    max_prompt_length: int = 256,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> list[torch.Tensor]:
    """log p(token | prompt, earlier tokens) of each response token under logits / temperature, the
    distribution `generate_responses` sampled from; prompts are encoded as it encoded them (pass the
    same `system_prompt`)."""
    model.eval()
    device = next(model.parameters()).device
    pad, scale = tokenizer.pad_token_id, temperature if temperature > 0 else 1.0
    encoded = [
        (chat_prompt_ids(tokenizer, p, max_prompt_length, system_prompt)[0], list(r))
        for p, r in zip(prompts, token_ids)
    ]
    result = [None] * len(prompts)
    for batch in batches_by_length([len(q) + len(r) for q, r in encoded], batch_size):
        pairs = [encoded[i] for i in batch]
        longest = max(max(len(r) for _, r in pairs), 1)
        ids, attention = pad_sequences([q + r for q, r in pairs], pad, side="left", device=device)
        logits = model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=(attention.cumsum(1) - 1).clamp(min=0),
            use_cache=False,
            logits_to_keep=longest + 1,
        ).logits[:, :-1]
        logp = torch.log_softmax(logits.float() / scale, dim=-1).gather(2, ids[:, -longest:].unsqueeze(-1)).squeeze(-1)
        for row, (i, (_, r)) in enumerate(zip(batch, pairs)):
            result[i] = logp[row, longest - len(r) :].cpu()
    return result
