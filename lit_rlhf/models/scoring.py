"""Score (prompt, response) texts with a reward model exactly as it was trained to read them."""

import torch

from lit_rlhf.text import batches_by_length, encode_prompt_response, pad_sequences


@torch.no_grad()
def score_responses(
    reward_model,
    tokenizer,
    prompts: list,
    responses: list[str],
    max_length: int,
    batch_size: int = 16,
    min_prompt_tokens: int = 64,
    *,
    ended: list[bool],
) -> torch.Tensor:
    """Rewards (fp32, on the model's device) for each prompt/response pair.

    A prompt is a user text or a conversation (`[{"role", "content"}, ...]`). Texts are
    re-tokenized with the reward model's own tokenizer and chat template (so a policy with another
    tokenizer is scored correctly) and cut as in training (`encode_prompt_response`; pass the
    export's `max_length` / `min_prompt_tokens`, `artifacts.reward_model_scoring`): long prompts
    lose their start; the response is cut at its end only to leave `min_prompt_tokens` for the prompt.
    `ended[i]`: response i ended (EOS generated) and reads as a closed assistant turn; a response cut
    at the generation limit reads as an open turn (`lit_rlhf.text.render_prompt_response`). Required,
    so that no scoring path can pass a cut answer off as a finished one.
    Batches are right-padded, rows of similar length together, and the model reads its reward at the
    last non-pad token.
    """
    device = next(reward_model.parameters()).device
    sequences = [
        encode_prompt_response(tokenizer, p, r, max_length, min_prompt_tokens, bool(e))[0]
        for p, r, e in zip(prompts, responses, ended, strict=True)
    ]
    scores = torch.empty(len(sequences), device=device)
    for batch in batches_by_length([len(s) for s in sequences], batch_size):
        input_ids, attention_mask = pad_sequences(
            [sequences[i] for i in batch], tokenizer.pad_token_id, side="right", device=device
        )
        scores[batch] = reward_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    return scores
