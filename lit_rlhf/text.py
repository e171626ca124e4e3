"""The one text layer: how prompts and responses become token ids, and how id lists become batches.

Every stage must read text the same way: the reward model is trained on pairs encoded by
`encode_prompt_response`, and PPO/GRPO/RLOO and the evaluation score responses with that same
encoding; the policy and evaluation generate from `chat_prompt_ids`. A generated response is scored as a
closed assistant turn when it ended (EOS) and as an open one when it was cut (`render_prompt_response`),
in training rollouts and evaluation alike. Keeping every chat-template
call here means a change to the encoding changes it everywhere at once. `pad_sequences` is the one
padding of id lists into (input_ids, attention_mask): right padding for scoring and training
batches, left padding for generation (new tokens go on the right).

Only torch and `lit_rlhf.errors` are imported, so models/, data/, modules/ and eval/ can all
depend on this module without depending on each other.
"""

from collections.abc import Sequence
from typing import Literal

import torch

from lit_rlhf.errors import UserInputError

# ---------------------------------------------------------------------------------------------
# Chat-template encoding


def as_messages(prompt) -> list[dict]:
    """A prompt string is one user turn; a list of {role, content} is a conversation so far."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def render_prompt_response(tokenizer, prompt, response: str, ended: bool = True) -> tuple[str, str]:
    """(prompt text up to the assistant header, response text), the response as a closed assistant
    turn (with its end-of-turn tokens) when it `ended`, else as the open turn it is: an answer cut at
    `max_new_tokens` must not read as one the assistant chose to end (TRL scores the generated ids
    as they are). This is the one place that decides how a (prompt, response, ended) triple reads."""
    messages = as_messages(prompt)
    if tokenizer.chat_template is None:
        raise UserInputError(
            f"The tokenizer '{tokenizer.name_or_path}' has no chat template, so prompts and responses "
            "cannot be rendered as user/assistant turns. Use an instruct model (e.g. SmolLM2-Instruct)."
        )
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=False, continue_final_message=not ended
    )
    if not full.startswith(head):
        raise UserInputError(
            f"The chat template of '{tokenizer.name_or_path}' does not render the prompt as a prefix of "
            "prompt + response, so the response cannot be kept whole while truncating the prompt."
        )
    return head, full[len(head) :]


def encode_prompt_response(
    tokenizer, prompt, response: str, max_length: int, min_prompt_tokens: int = 64, ended: bool = True
) -> tuple[list[int], dict]:
    """Token ids of prompt + response through the chat template, at most `max_length` long.

    The response keeps its start: it is cut at its end only when it would leave fewer than
    `min_prompt_tokens` for the prompt. The prompt is then cut from the *left* (system header and
    older turns go first, the question's end and the assistant header stay). The second value
    holds the cut flags, `prompt_tokens` (kept: the response starts there) and
    `untruncated_tokens` (the length before any cut). `ended`: see `render_prompt_response`.
    """
    return encode_prompt_responses(tokenizer, prompt, [response], max_length, min_prompt_tokens, [ended])[0]


def encode_prompt_responses(
    tokenizer,
    prompt,
    responses: Sequence[str],
    max_length: int,
    min_prompt_tokens: int = 64,
    ended: Sequence[bool] | None = None,
) -> list[tuple[list[int], dict]]:
    """`encode_prompt_response` for several responses to one prompt, whose prompt is cut ONCE, to
    the budget the longest (cut) response leaves: every response conditions on identical prompt
    tokens, as a preference pair must (DPO compares the two log-probs given the same prompt)."""
    if not 0 <= min_prompt_tokens < max_length:
        raise UserInputError(f"min_prompt_tokens ({min_prompt_tokens}) must be in [0, max_length {max_length}).")
    rendered = [
        render_prompt_response(tokenizer, prompt, r, e)
        for r, e in zip(responses, ended or [True] * len(responses), strict=True)
    ]
    prompt_ids = tokenizer(rendered[0][0], add_special_tokens=False)["input_ids"]
    tails = [tokenizer(tail, add_special_tokens=False)["input_ids"] for _, tail in rendered]
    kept_tails = [tail[: max_length - min_prompt_tokens] for tail in tails]
    budget = max_length - max(len(tail) for tail in kept_tails)
    kept_prompt = prompt_ids[len(prompt_ids) - budget :] if len(prompt_ids) > budget else prompt_ids
    return [
        (
            kept_prompt + kept,
            {
                "prompt_cut": len(prompt_ids) > budget,
                "prompt_over_max_length": len(prompt_ids) > max_length,
                "response_cut": len(tail) > len(kept),
                "untruncated_tokens": len(prompt_ids) + len(tail),
                "prompt_tokens": len(kept_prompt),
            },
        )
        for tail, kept in zip(tails, kept_tails)
    ]


def require_system_prompt_renders(tokenizer, system_prompt: str | None) -> None:
    """Refuse a system instruction the chat template drops or cannot render (some templates have no
    system role, others replace or ignore it): the policy would silently train without it."""
    if system_prompt is None:
        return
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": "Hi."}]
    from jinja2 import TemplateError  # a template's raise_exception (e.g. "no system role") raises it

    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError) as error:
        rendered = f"<{type(error).__name__}: {error}>"
    if not system_prompt.strip() or system_prompt.strip() not in rendered:
        raise UserInputError(
            f"The chat template of '{tokenizer.name_or_path}' does not render the system instruction "
            f"{system_prompt!r} (it rendered {rendered[:200]!r}). Use a model whose chat template has a system "
            "role, or leave system_prompt unset (null)."
        )


def chat_prompt_ids(
    tokenizer, user_text: str | list[dict], max_length: int, system_prompt: str | None = None
) -> tuple[list[int], str | list[dict]]:
    """Token ids of `user_text` as a user turn plus the generation prompt, at most `max_length` long.

    Too-long prompts lose the *start* of the user text, so the chat template (system turn, user
    header, generation prompt) stays intact. Returns (ids, the user text actually kept).
    A conversation (`[{"role", "content"}, ...]` ending with a user turn) loses its oldest
    user/assistant exchanges first, then the start of its last user text. `system_prompt`, when
    given, is the system turn in front (never cut; it replaces the template's default one).
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    if not isinstance(user_text, str):
        messages = list(user_text)
        while len(messages) > 1:
            ids = tokenizer.apply_chat_template(
                system + messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if len(ids) <= max_length:
                return ids, messages
            messages = messages[2:]
        ids, kept = chat_prompt_ids(tokenizer, messages[0]["content"], max_length, system_prompt)
        return ids, [{"role": "user", "content": kept}]

    def render(text: str) -> list[int]:
        return tokenizer.apply_chat_template(
            system + as_messages(text), add_generation_prompt=True, tokenize=True, return_dict=False
        )

    ids = render(user_text)
    if len(ids) <= max_length:
        return ids, user_text
    overhead = len(render(""))
    if overhead >= max_length:
        raise UserInputError(
            f"max_prompt_length={max_length} is shorter than the chat template alone ({overhead} tokens)."
        )
    text_ids = tokenizer(user_text, add_special_tokens=False)["input_ids"]
    budget = max_length - overhead
    while budget > 0:
        kept = tokenizer.decode(text_ids[-budget:])
        ids = render(kept)
        if len(ids) <= max_length:
            return ids, kept
        budget -= len(ids) - max_length
    raise UserInputError(f"Could not fit the prompt into max_prompt_length={max_length} tokens.")


# ---------------------------------------------------------------------------------------------
# Padding


def pad_sequences(
    sequences: Sequence[Sequence[int] | torch.Tensor],
    pad_id: int,
    side: Literal["left", "right"] = "right",
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both long [len(sequences), longest], mask 1 on the real tokens.

    `side="right"`: tokens start at column 0 (scoring and training batches; a scorer reads the
    last non-pad token). `side="left"`: tokens end at the last column (generation appends there).
    Sequences are lists of ids or 1-D tensors. The batch is built on the CPU and moved to
    `device` once (one copy, not one per row).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        columns = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        input_ids[row, columns] = torch.as_tensor(seq, dtype=torch.long).cpu()
        attention_mask[row, columns] = 1
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return input_ids, attention_mask


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length, shortest first: a padded batch is as wide as its longest
    row, so grouping by length about halves the padded tokens of a typical prompt set, and the last,
    smallest batch takes the longest rows. Callers put each result back at its index."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
