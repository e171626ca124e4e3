"""Evaluate the pretrained, PPO-full and PPO-LoRA policies and write the RLHF report.

    python -m lit_rlhf.evaluate --config configs/evaluate.yaml [--out_dir ...]

Generates responses to the unseen prompts the PPO data module held out (same seed and decoding
for every model), scores them with the frozen reward model, and writes under `out_dir`:
`rewards.csv` (one row per prompt and model), `summary.json`, `kl.png`, the human-evaluation
tables, and `report.md`; the same results go to an offline W&B run in `out_dir/wandb`.
"""

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from jsonargparse import ArgumentParser, ActionConfigFile
from peft import PeftModel, get_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors import SafetensorError

from lit_rlhf.artifacts import reward_model_info, reward_model_scoring, reward_model_seen
from lit_rlhf.data.oasst1_prompts import EVAL_PROMPTS_FILE, read_eval_prompts
from lit_rlhf.errors import NonFiniteError, UserInputError, as_paragraph, reason
from lit_rlhf.eval import human_ratings
from lit_rlhf.eval.generation import generate_responses, is_truncated
from lit_rlhf.eval.kl_monitor import interpret_kl, plot_kl, ppo_curves
from lit_rlhf.eval.stats import bootstrap_mean_ci, paired_gain_ci, repetition_rate, win_rate
from lit_rlhf.logging import markdown_table
from lit_rlhf.models.hf import (
    DEFAULT_MODEL,
    load_causal_lm,
    load_sequence_scorer,
    load_tokenizer,
    require_tokenizer_fits,
)
from lit_rlhf.models.scoring import score_responses

BASE = "Pretrained"


@dataclass
class EvalSettings:
    """What to compare and how. `ppo_full` / `ppo_lora` are PPO run folders (their exported
    `policy/` or `policy_adapter/` inside); either may be null to skip that variant.
    `reward_max_length`: null scores with the max length the reward model was trained with (its
    export record); a value overrides it, with a warning when it differs."""

    reward_model: str = "runs/reward_model/reward_model"
    base_model: str = DEFAULT_MODEL
    ppo_full: str | None = "runs/ppo_full"
    ppo_lora: str | None = "runs/ppo_lora"
    eval_prompts: str | None = None
    out_dir: str = "runs/evaluation"
    num_prompts: int | None = None
    min_prompts: int = 50
    max_new_tokens: int = 128
    temperature: float = 0.7
    max_prompt_length: int = 256
    reward_max_length: int | None = None
    batch_size: int = 16
    seed: int = 1234
    human_eval_prompts: int = 3
    human_eval_seed: int = 7
    kl_low: float = 0.02
    kl_high: float = 0.1
    bootstrap_resamples: int = 10000
    reward_model_run: str | None = None
    tinygpt_pretrain: str | None = None
    tinygpt_sft: str | None = None
    tinygpt_rl: str | None = None
    wandb_project: str = "lit_rlhf"
    wandb_mode: str = "offline"


def load_policies(s: EvalSettings) -> dict[str, tuple]:
    """{name: (model, tokenizer)} for the base model and each PPO variant that has an export."""
    policies = {BASE: (load_causal_lm(s.base_model), load_tokenizer(s.base_model, padding_side="left"))}
    if s.ppo_full:
        folder = Path(s.ppo_full) / "policy"
        if not (folder / "config.json").exists():
            raise UserInputError(f"No exported full-PPO policy at '{folder}'. Run configs/ppo_full.yaml first.")
        policies["PPO (full)"] = (load_causal_lm(str(folder)), load_tokenizer(str(folder), padding_side="left"))
    if s.ppo_lora:
        folder = Path(s.ppo_lora) / "policy_adapter"
        if not (folder / "adapter_config.json").exists():
            raise UserInputError(f"No LoRA adapter at '{folder}'. Run configs/ppo_lora.yaml first.")
        policies["PPO (LoRA)"] = (load_lora_policy(s.base_model, folder), load_tokenizer(str(folder), padding_side="left"))
    for name, (model, tokenizer) in policies.items():
        require_tokenizer_fits(model, tokenizer, name)
    return policies


def load_lora_policy(base_model: str, folder: Path):
    """The base model with the PPO-LoRA adapter merged in.

    PEFT loads adapter weights non-strictly: on a base model with fewer layers the extra adapter
    tensors are dropped, with more layers some LoRA layers stay untrained, and neither is an error.
    Here every adapter tensor must land and every LoRA layer must get one.
    """
    try:
        saved = set(load_peft_weights(str(folder)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise UserInputError(
            f"Could not read the LoRA adapter weights in '{folder}' ({reason(error)}): the file is truncated or "
            "corrupt. Copy the folder again or re-run configs/ppo_lora.yaml."
        ) from error
    trained_on = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")

    def mismatch(detail: str) -> UserInputError:
        return UserInputError(
            f"The LoRA adapter in '{folder}' does not fit the base model '{base_model}' ({detail}). Set base_model "
            f"to the model the adapter was trained on ('{trained_on}', base_model_name_or_path in adapter_config.json)."
        )

    try:
        model = PeftModel.from_pretrained(load_causal_lm(base_model), folder)
    except (RuntimeError, ValueError, KeyError) as error:
        raise mismatch(reason(error)) from error
    loaded = set(get_peft_model_state_dict(model))
    if saved != loaded:
        raise mismatch(f"{len(saved - loaded)} adapter tensors have no place in it and {len(loaded - saved)} of its "
                       "LoRA tensors are missing from the adapter")
    return model.merge_and_unload()


def eval_prompt_file(s: EvalSettings) -> Path:
    if s.eval_prompts:
        return Path(s.eval_prompts)
    for run in (s.ppo_full, s.ppo_lora):
        if run and (Path(run) / EVAL_PROMPTS_FILE).exists():
            return Path(run) / EVAL_PROMPTS_FILE
    raise UserInputError("No eval_prompts given and no PPO run folder holds eval_prompts.jsonl.")


def _valid_prompt(prompt) -> bool:
    """A non-empty text, or a conversation of {role, content} messages that ends with the user's turn."""
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)
        and prompt[-1].get("role") == "user"
    )


def prompt_text(prompt) -> str:
    """A prompt as people read it: the text, or a conversation as `role: content` lines."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def load_eval_prompts(s: EvalSettings) -> list[dict]:
    """The prompt rows, checked: a hand-edited or foreign file fails here, not after generation."""
    file = eval_prompt_file(s)
    try:
        rows = read_eval_prompts(file)
    except ValueError as error:  # a line that is not JSON
        raise UserInputError(f"'{file}' is not a JSON-lines file ({reason(error)}). Fix the line or re-run PPO.") from error
    bad = [i for i, row in enumerate(rows, 1) if not isinstance(row, dict) or not _valid_prompt(row.get("prompt"))]
    if bad:
        raise UserInputError(
            f"{len(bad)} rows of '{file}' (the first is row {bad[0]}) have no non-empty 'prompt' text. Evaluation "
            'prompts are JSON lines {"prompt": ..., "message_id": ..., "message_tree_id": ...} as the PPO stage '
            "writes them ('prompt' is a text, or a conversation as a list of {\"role\", \"content\"} messages "
            "ending with the user's turn)."
        )
    return rows[: s.num_prompts]


def scoring_settings(s: EvalSettings) -> dict:
    """How the reward model reads (prompt, response): as it was trained (its export record), unless
    `reward_max_length` overrides it."""
    recorded = "scoring" in reward_model_info(s.reward_model)
    scoring = {
        **reward_model_scoring(s.reward_model),
        "scoring_source": "as it was trained" if recorded else "the old defaults: its export records no settings",
    }
    if s.reward_max_length is not None and s.reward_max_length != scoring["max_length"]:
        print(
            f"[lit_rlhf] warning: scoring with reward_max_length {s.reward_max_length}, but the reward model was "
            f"trained with max length {scoring['max_length']} ({s.reward_model}); its rewards may be off."
        )
        scoring["scoring_source"] = (
            f"reward_max_length overrides the max length {scoring['max_length']} it was trained with"
        )
        scoring["max_length"] = s.reward_max_length
    return scoring


def reward_model_overlap(s: EvalSettings, rows: list[dict]) -> int | None:
    """How many evaluation prompts come from a message tree (or are a post) the reward model
    trained or validated on; None when its export does not record them."""
    if "trained_on" not in reward_model_info(s.reward_model):
        return None
    seen = reward_model_seen(s.reward_model)
    return sum(r.get("message_tree_id") in seen["message_tree_ids"] or r.get("message_id") in seen["post_ids"]
               for r in rows)


def overlap_text(overlap: int | None) -> str:
    if overlap is None:
        return ("Overlap with the reward model's data unknown: its export records no training data "
                "(lit_rlhf_export.json predates the record, or the model comes from elsewhere).")
    if overlap == 0:
        return "0 evaluation prompts share a message tree with the reward model's training/validation data."
    return (f"**Warning: {overlap} evaluation prompts share a message tree with the reward model's "
            "training/validation data**, so their rewards are not on unseen data (re-run PPO against this "
            "reward model: its data module keeps them out of the evaluation prompts).")


def reward_table(rewards: pd.DataFrame, s: EvalSettings) -> tuple[list[str], list[list], dict]:
    """Per model: mean reward [95% CI], gain over the base [paired CI], win rate, length, repetition."""
    base = rewards[rewards.model == BASE].sort_values("prompt_id")
    columns = ["Model", "Mean reward [95% CI]", "Gain vs pretrained [95% CI]", "Win rate vs pretrained",
               "Mean length (tokens)", "Truncated share", "Repetition (3-gram)"]
    rows, summary = [], {}
    for model, group in rewards.groupby("model", sort=False):
        group = group.sort_values("prompt_id")
        mean = bootstrap_mean_ci(group.reward, n_resamples=s.bootstrap_resamples, seed=s.seed)
        entry = {"mean_reward": asdict(mean), "mean_length": group.length.mean(),
                 "truncated_share": group.truncated.mean(), "repetition": group.repetition.mean()}
        gain_text = win_text = "—"
        if model != BASE:
            gain = paired_gain_ci(group.reward.values, base.reward.values, n_resamples=s.bootstrap_resamples, seed=s.seed)
            entry["reward_gain"] = asdict(gain)
            entry["win_rate"] = win_rate(group.reward.values, base.reward.values)
            gain_text, win_text = str(gain), f"{entry['win_rate']:.0%}"
        summary[model] = entry
        rows.append([model, str(mean), gain_text, win_text, f"{entry['mean_length']:.1f}",
                     f"{entry['truncated_share']:.0%}", f"{entry['repetition']:.3f}"])
    return columns, rows, summary


def evaluate(s: EvalSettings) -> Path:
    """Every input is read and checked before the long generation, and `out_dir` is created only
    once all rewards are in and finite: bad input leaves nothing half-written."""
    out = Path(s.out_dir)
    prompt_rows = load_eval_prompts(s)
    if len(prompt_rows) < s.min_prompts:
        raise UserInputError(
            f"Only {len(prompt_rows)} unseen evaluation prompts; the evaluation asks for at least {s.min_prompts}. "
            "Raise data.num_eval_prompts in the PPO run (its log says when the data holds too few prompts the "
            "reward model did not see) or lower min_prompts."
        )
    prompts = [row["prompt"] for row in prompt_rows]
    texts = [prompt_text(p) for p in prompts]
    scoring = scoring_settings(s)
    overlap = reward_model_overlap(s, prompt_rows)
    kl_runs = {name: ppo_curves(run) for name, run in (("PPO (full)", s.ppo_full), ("PPO (LoRA)", s.ppo_lora)) if run}
    reward_tokenizer = load_tokenizer(s.reward_model, padding_side="right")
    reward_model = load_sequence_scorer(s.reward_model, reward_tokenizer.pad_token_id, trained_head=True).eval()
    require_tokenizer_fits(reward_model, reward_tokenizer, f"the reward model '{s.reward_model}'")
    policies = load_policies(s)
    rng = random.Random(s.human_eval_seed)
    human_ids = sorted(rng.sample(range(len(texts)), min(s.human_eval_prompts, len(texts))))

    records, human = [], {}
    for name, (model, tokenizer) in policies.items():
        responses, token_ids = generate_responses(
            model, tokenizer, prompts, s.max_new_tokens, s.temperature, s.seed, s.batch_size, s.max_prompt_length,
            desc=f"generating ({name})",
        )
        scores = score_responses(reward_model, reward_tokenizer, prompts, responses, scoring["max_length"],
                                 s.batch_size, scoring["min_prompt_tokens"])
        if not torch.isfinite(scores).all():
            raise NonFiniteError(
                f"The reward model '{s.reward_model}' gave NaN/inf rewards to {int((~torch.isfinite(scores)).sum())} "
                f"of the {len(scores)} responses of {name}: its weights are broken (a diverged reward-model run?). "
                "Evaluate with the best reward-model export, or retrain it with a lower learning rate."
            )
        for i, (response, ids, score) in enumerate(zip(responses, token_ids, scores.tolist())):
            records.append({"model": name, "prompt_id": i, "prompt": texts[i], "response": response,
                            "reward": score, "length": len(ids), "truncated": is_truncated(ids, s.max_new_tokens),
                            "repetition": repetition_rate(ids)})
        human[name] = [{"prompt": texts[i], "response": responses[i]} for i in human_ids]
        del model
    out.mkdir(parents=True, exist_ok=True)
    rewards = pd.DataFrame(records)
    rewards.to_csv(out / "rewards.csv", index=False)
    (out / human_ratings.GENERATIONS_FILE).write_text(json.dumps(human, indent=2, ensure_ascii=False), encoding="utf-8")
    columns, rows, summary = reward_table(rewards, s)

    kl_text = [interpret_kl(c["objective/kl_per_token"].tolist(), s.kl_low, s.kl_high, name) for name, c in kl_runs.items()]
    kl_png = plot_kl(kl_runs, out / "kl.png", s.kl_low, s.kl_high) if kl_runs else None
    summary["kl_interpretation"] = kl_text
    summary["num_prompts"] = len(texts)
    summary.update({f"reward_{key}": value for key, value in scoring.items()})  # flat: dict entries are models
    summary["prompts_seen_by_reward_model"] = overlap
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    human_md = human_ratings.summarize(out)
    report = write_report(out, s, columns, rows, kl_png, kl_text, human_md, rewards, scoring, overlap)
    log_to_wandb(s, out, columns, rows, rewards, kl_png, report)
    return report


def write_report(out, s, columns, rows, kl_png, kl_text, human_md, rewards, scoring, overlap) -> Path:
    sections = ["# RLHF evaluation report", ""]
    preview = Path(s.reward_model_run or Path(s.reward_model).parent) / "preprocessed_preview.md"
    if preview.exists():
        sections += ["## Reward model: preprocessed inputs (first rows)", "", preview.read_text(encoding="utf-8"), ""]
    sections += [
        f"## Reward on {rewards.prompt_id.nunique()} unseen prompts",
        "",
        f"Same seed ({s.seed}) and decoding for every model: temperature {s.temperature}, top_k 0, top_p 1, "
        f"up to {s.max_new_tokens} new tokens. Rewards from the frozen reward model `{s.reward_model}`, "
        f"reading at most {scoring['max_length']} tokens with at least {scoring['min_prompt_tokens']} for the prompt "
        f"({scoring['scoring_source']}). "
        "Intervals: 95% percentile bootstrap over prompts (paired for gains); ties count half in win rates. "
        f"Truncated share: responses that did not end within {s.max_new_tokens} new tokens, scored unfinished.",
        "",
        overlap_text(overlap),
        "",
        markdown_table(columns, rows),
        "",
    ]
    if kl_png:
        sections += ["## KL divergence vs PPO step", "", f"![KL vs step]({kl_png.name})", "", *[f"- {t}" for t in kl_text], ""]
    sections += ["## Manual evaluation", "", human_md.read_text(encoding="utf-8"),
                 "Give the ratings with `python -m lit_rlhf.eval.human_ratings rate --eval_dir "
                 f"{out}` (resumable), then rebuild this report or read `human_ratings.md`.", ""]
    sample = rewards[rewards.prompt_id < 3]
    sections += ["## Sample generations", "",
                 markdown_table(["Prompt", "Model", "Reward", "Response"],
                                [[r.prompt, r.model, f"{r.reward:.3f}", r.response] for r in sample.itertuples()]), ""]
    if s.tinygpt_pretrain or s.tinygpt_sft or s.tinygpt_rl:
        from lit_rlhf.eval.tinygpt_results import results_table, to_markdown

        table = results_table(s.tinygpt_pretrain, s.tinygpt_sft, s.tinygpt_rl)
        sections += ["## TinyGPT: pre-training vs SFT vs RL-lite", "", to_markdown(table), ""]
    report = out / "report.md"
    report.write_text("\n".join(sections), encoding="utf-8")
    return report


def log_to_wandb(s, out, columns, rows, rewards, kl_png, report) -> None:
    import wandb

    run = wandb.init(project=s.wandb_project, group="evaluation", tags=["evaluation"], dir=str(out), mode=s.wandb_mode)
    run.log({
        "eval/reward_table": wandb.Table(columns=columns, data=rows),
        "eval/generations": wandb.Table(dataframe=rewards),
        **({"eval/kl_plot": wandb.Image(str(kl_png))} if kl_png else {}),
    })
    run.save(str(report), base_path=str(out))
    run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(EvalSettings, nested_key=None)
    cfg = parser.parse_args(argv)
    settings = EvalSettings(**{k: v for k, v in vars(cfg).items() if k in EvalSettings.__dataclass_fields__})
    try:
        report = evaluate(settings)
    except UserInputError as error:
        print(as_paragraph(error), file=sys.stderr)
        sys.exit(2)
    print(f"[lit_rlhf] report: {report}")


if __name__ == "__main__":
    main()
