"""The TinyGPT side study: a char-level GPT pretrained on a text corpus, fine-tuned on instruction ->
answer pairs and tuned with REINFORCE (RL-lite), with its results table.

Layers, each importing only those before it: tokenizer, corpus -> wikitext, sft_data, prompts (data)
-> model -> pretrain -> sft, rl_lite (Lightning modules) -> results (report)."""
