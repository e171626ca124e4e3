"""Score (prompt, response) texts with a reward model exactly as it was trained to read them."""

import torch

from lit_rlhf.text import encode_prompt_response, pad_sequences


@torch.no_grad()
def score_responses(
    reward_model, tokenizer, prompts: list, responses: list[str], max_length: int, batch_size: int = 16,
    min_prompt_tokens: int = 64,
) -> torch.Tensor:
    """Rewards (fp32, on the model's device) for each prompt/response pair.

    A prompt is a user text or a conversation (`[{"role", "content"}, ...]`). Texts are
    re-tokenized with the reward model's own tokenizer and chat template (so a policy with another
    tokenizer is scored correctly) and cut as in training (`encode_prompt_response`; pass the
    export's `max_length` / `min_prompt_tokens`, `artifacts.reward_model_scoring`): long prompts
    lose their start; the response is cut at its end only to leave `min_prompt_tokens` for the prompt.
    The batch is right-padded and the model reads its reward at the last non-pad token.
    """
    device = next(reward_model.parameters()).device
    scores = []
    for start in range(0, len(prompts), batch_size):
        sequences = [
            encode_prompt_response(tokenizer, p, r, max_length, min_prompt_tokens)[0]
            for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])
        ]
        input_ids, attention_mask = pad_sequences(sequences, tokenizer.pad_token_id, side="right", device=device)
        out = reward_model(input_ids=input_ids, attention_mask=attention_mask)
        scores.append(out.logits[:, 0].float())
    return torch.cat(scores)
