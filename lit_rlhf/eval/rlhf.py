"""The RLHF evaluation as one computation over any number of policies.

Every policy (and the base model) answers the same unseen prompts with one seed and one decoding
setting; the responses are scored by the training reward model (the one the policies optimised)
and, when given, by a judge reward model trained on other message trees. Per policy the result
holds the gains over the base model with paired 95% intervals under both, a length-controlled gain
(the gain of the rewards' residuals after the base model's regression of reward on response length,
`length_residuals`), the truncated share (answers cut at `max_new_tokens`, scored as open turns), the per-token KL
to the base model measured on the evaluation's own samples (the same way for every method), and
readings that flag possible reward hacking. `lit_rlhf.eval.rlhf_report` renders the result.
"""

import gc
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.utils import load_peft_weights
from pydantic import PositiveInt
from safetensors import SafetensorError

from lit_rlhf.artifacts import (
    EVAL_PROMPTS,
    POLICY,
    POLICY_ADAPTER,
    policy_info,
    read_eval_prompts,
    reward_model_info,
    reward_model_scoring,
    reward_model_seen,
)
from lit_rlhf.errors import NonFiniteError, UserInputError, reason
from lit_rlhf.eval.generation import generate_responses, is_truncated, response_logprobs
from lit_rlhf.eval.kl_monitor import interpret_kl, ppo_curves
from lit_rlhf.eval.runs import read_metrics
from lit_rlhf.eval.stats import Interval, bootstrap_mean_ci, paired_gain_ci, repetition_rate, win_rate
from lit_rlhf.models.hf import (
    DEFAULT_MODEL,
    load_causal_lm,
    load_sequence_scorer,
    load_tokenizer,
    require_tokenizer_fits,
)
from lit_rlhf.models.scoring import score_responses
from lit_rlhf.text import require_system_prompt_renders

BASE = "Pretrained"
JUDGES = ("training", "judge")


@dataclass
class EvalSettings:
    """What to compare and how.

    Args:
        reward_model: the training reward model's export folder (the policies optimised it).
        judge_reward_model: a second reward model, trained on other message trees, that the policies never saw.
        base_model: the model every policy started from (hub id, local folder or embedded:smollm2).
        policies: name -> training run folder holding its export (`policy/`, or a LoRA `policy_adapter/` on
            base_model): any number of PPO, GRPO, RLOO or DPO runs.
        eval_prompts: JSONL of `prompt, message_id, message_tree_id` rows (default: the first policy run's).
        out_dir: where report.md, rewards.csv, summary.json, kl.png and the W&B run go.
        num_prompts: evaluate the first N prompts only (default: all).
        min_prompts: refuse fewer prompts than this (the intervals would mean little).
        max_new_tokens: the answer length limit, as the policies were trained.
        temperature: sampling temperature, as the policies were trained.
        samples_per_prompt: answers sampled per prompt and model; a prompt's reward is their mean, which averages
            out sampling noise (the intervals resample prompts).
        max_prompt_length: prompts are cut to this many tokens, as the policies were trained.
        reward_max_length: null scores with the max length each reward model was trained with (its export record);
            a value overrides it, with a warning when it differs.
        batch_size: sequences per forward pass when measuring KL and scoring.
        generation_batch_size: prompts per `generate` call (default: batch_size); larger batches pay off on a CPU
            for generation while the padded full-sequence passes do not.
        seed: sampling seed, the same for every model.
        human_eval_prompts: prompts shown in the human-rating tables.
        human_eval_seed: seed of that choice.
        kl_low: per-token KL below which a policy reads as "barely moved".
        kl_high: per-token KL above which a policy reads as "moved far" (reward hacking risk).
        bootstrap_resamples: resamples of the 95% intervals.
        reward_model_run: the reward model's training run folder, for its curves in the report.
        data_note: one line naming the data, printed first in the report.
        wandb_project: W&B project of the evaluation run.
        wandb_mode: W&B mode of the evaluation run (default: WANDB_MODE, else offline).
    """

    reward_model: str = "runs/reward_model/reward_model"
    judge_reward_model: str | None = None
    base_model: str = DEFAULT_MODEL
    policies: dict[str, str] = field(
        default_factory=lambda: {"PPO (full)": "runs/ppo_full", "PPO (LoRA)": "runs/ppo_lora"}
    )
    eval_prompts: str | None = None
    out_dir: str = "runs/evaluation"
    num_prompts: int | None = None
    min_prompts: int = 50
    max_new_tokens: int = 128
    temperature: float = 0.7
    samples_per_prompt: PositiveInt = 1
    max_prompt_length: int = 256
    reward_max_length: int | None = None
    batch_size: PositiveInt = 16
    generation_batch_size: PositiveInt | None = None
    seed: int = 1234
    human_eval_prompts: int = 3
    human_eval_seed: int = 7
    kl_low: float = 0.02
    kl_high: float = 0.1
    bootstrap_resamples: int = 10000
    reward_model_run: str | None = None
    data_note: str | None = None
    wandb_project: str = "lit_rlhf"
    wandb_mode: Literal["online", "offline", "disabled"] | None = None


@dataclass
class Judge:
    """A reward model as the evaluation used it: how it scored and how many prompts it had seen."""

    role: str
    path: str
    scoring: dict
    overlap: int | None


@dataclass
class EvalResult:
    settings: EvalSettings
    records: pd.DataFrame  # one row per (model, prompt)
    judges: list[Judge]
    summary: dict[str, dict]  # per model
    kl_curves: dict[str, pd.DataFrame]  # per policy run that logged a KL series
    readings: list[str]
    human: dict[str, list[dict]]  # the rated generations per model
    system_prompt: str | None = None  # the policies' system instruction, given to every model


# ---------------------------------------------------------------------------- inputs


def policy_export(run: str | Path) -> tuple[Path, bool]:
    """(export folder, is a LoRA adapter) of a training run folder, or the export folder itself."""
    run = Path(run)
    for folder, adapter in (
        (run / POLICY, False),
        (run / POLICY_ADAPTER, True),
        (run, (run / "adapter_config.json").exists()),
    ):
        if (folder / ("adapter_config.json" if adapter else "config.json")).exists():
            return folder, adapter
    raise UserInputError(
        f"No exported policy in '{run}': expected policy/ (a full fine-tune) or policy_adapter/ (LoRA) inside it, "
        "which a PPO, GRPO, RLOO or DPO run writes when its fit ends. Run that stage first or fix the path."
    )


def load_policy(base_model: str, run: str) -> tuple:
    folder, adapter = policy_export(run)
    model = load_lora_policy(base_model, folder) if adapter else load_causal_lm(str(folder))
    return model, load_tokenizer(str(folder), padding_side="left")


def load_lora_policy(base_model: str, folder: Path):
    """The base model with a LoRA adapter merged in.

    PEFT loads adapter weights non-strictly: on a base model with fewer layers the extra adapter
    tensors are dropped, with more layers some LoRA layers stay untrained, and neither is an error.
    Here every adapter tensor must land and every LoRA layer must get one.
    """
    try:
        saved = set(load_peft_weights(str(folder)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise UserInputError(
            f"Could not read the LoRA adapter weights in '{folder}' ({reason(error)}): the file is truncated or "
            "corrupt. Copy the folder again or re-run the stage that wrote it."
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
        raise mismatch(
            f"{len(saved - loaded)} adapter tensors have no place in it and {len(loaded - saved)} of its "
            "LoRA tensors are missing from the adapter"
        )
    return model.merge_and_unload()


def eval_prompt_file(s: EvalSettings) -> Path:
    if s.eval_prompts:
        return Path(s.eval_prompts)
    for run in s.policies.values():
        if (Path(run) / EVAL_PROMPTS).exists():
            return Path(run) / EVAL_PROMPTS
    raise UserInputError(
        "No eval_prompts given and no policy run folder holds eval_prompts.jsonl (PPO, GRPO and "
        "RLOO runs write it; for DPO runs pass --eval_prompts)."
    )


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


def policies_system_prompt(s: EvalSettings) -> str | None:
    """The system instruction the policies trained with (their export records): every model, the
    base included, answers under it. Policies trained under different ones cannot be compared."""
    prompts = {name: policy_info(policy_export(run)[0]).get("system_prompt") for name, run in s.policies.items()}
    if len(set(prompts.values())) > 1:
        raise UserInputError(
            f"The policies were trained with different system instructions ({prompts}; from the system_prompt in "
            "each export's lit_rlhf_export.json), so no one setting answers for all of them. Evaluate the policies "
            "of each system instruction in a separate evaluation (--policies)."
        )
    return next(iter(prompts.values()), None)


def load_eval_prompts(s: EvalSettings) -> list[dict]:
    """The prompt rows, checked: a hand-edited or foreign file fails here, not after generation."""
    file = eval_prompt_file(s)
    try:
        rows = read_eval_prompts(file)
    except ValueError as error:  # a line that is not JSON
        raise UserInputError(
            f"'{file}' is not a JSON-lines file ({reason(error)}). Fix the line or re-run PPO."
        ) from error
    bad = [i for i, row in enumerate(rows, 1) if not isinstance(row, dict) or not _valid_prompt(row.get("prompt"))]
    if bad:
        raise UserInputError(
            f"{len(bad)} rows of '{file}' (the first is row {bad[0]}) have no non-empty 'prompt' text. Evaluation "
            'prompts are JSON lines {"prompt": ..., "message_id": ..., "message_tree_id": ...} as the PPO stage '
            'writes them (\'prompt\' is a text, or a conversation as a list of {"role", "content"} messages '
            "ending with the user's turn)."
        )
    rows = rows[: s.num_prompts]
    if len(rows) < s.min_prompts:
        raise UserInputError(
            f"Only {len(rows)} unseen evaluation prompts; the evaluation asks for at least {s.min_prompts}. "
            "Raise data.num_eval_prompts in the PPO run (its log says when the data holds too few prompts the "
            "reward model did not see) or lower min_prompts."
        )
    return rows


def scoring_settings(path: str, override: int | None) -> dict:
    """How a reward model reads (prompt, response): as it was trained (its export record), unless
    `override` replaces the max length."""
    recorded = "scoring" in reward_model_info(path)
    scoring = {
        **reward_model_scoring(path),
        "scoring_source": "as it was trained" if recorded else "the old defaults: its export records no settings",
    }
    if override is not None and override != scoring["max_length"]:
        print(
            f"[lit_rlhf] warning: scoring with reward_max_length {override}, but the reward model was "
            f"trained with max length {scoring['max_length']} ({path}); its rewards may be off."
        )
        scoring["scoring_source"] = (
            f"reward_max_length overrides the max length {scoring['max_length']} it was trained with"
        )
        scoring["max_length"] = override
    return scoring


def reward_model_overlap(path: str, rows: list[dict]) -> int | None:
    """How many evaluation prompts come from a message tree (or are a post) the reward model
    trained or validated on; None when its export does not record them."""
    if "trained_on" not in reward_model_info(path):
        return None
    seen = reward_model_seen(path)
    return sum(
        r.get("message_tree_id") in seen["message_tree_ids"] or r.get("message_id") in seen["post_ids"] for r in rows
    )


# ---------------------------------------------------------------------------- statistics and readings


def length_residuals(rewards: pd.Series, lengths: pd.Series, fit_on: np.ndarray) -> np.ndarray:
    """Rewards less what the base model's straight line in response length predicts.

    r_i - (a + b L_i), with b = Cov(L, r) / Var(L) and a = mean(r) - b mean(L) over the `fit_on`
    rows (the base model's answers; b = 0 if their lengths are all equal). A policy's
    length-controlled gain is then mean_p[r_pol - r_base] - b mean_p[L_pol - L_base] over prompts p:
    what its gain would be if extra length bought what it buys the base model. Fitting on the base
    alone keeps a policy's figure independent of which other policies are evaluated (a fit pooled
    over every model's answers moved with them).
    """
    x, y = lengths.to_numpy(float), rewards.to_numpy(float)
    fx, fy = x[fit_on], y[fit_on]
    variance = fx.var()
    slope = ((fx - fx.mean()) * (fy - fy.mean())).mean() / variance if variance > 0 else 0.0
    return y - (fy.mean() + slope * (x - fx.mean()))


def reward_hacking_reading(name: str, training: Interval, judge: Interval | None, length_controlled: Interval) -> str:
    """A reading of one policy's gains that follows the numbers (significant = 95% interval above 0)."""
    if training.low <= 0:
        return f"{name}: no significant gain under the training reward model ({training})."
    flags = []
    if judge is not None and judge.low <= 0:
        flags.append(f"the judge reward model, which it never trained against, sees no significant gain ({judge})")
    if length_controlled.mean < 0.5 * training.mean:
        flags.append(
            f"length explains most of the gain (length-controlled gain {length_controlled} of {training.mean:+.3f})"
        )
    if flags:
        return (
            f"{name}: possible reward hacking: a significant training-RM gain ({training}), but "
            + "; and ".join(flags)
            + "."
        )
    judged = f" and under the judge ({judge})" if judge is not None else " (no judge reward model given)"
    return (
        f"{name}: significant gain under the training reward model ({training}){judged}, and most of it "
        f"remains after controlling for length ({length_controlled})."
    )


TRUNCATED_SHARE_LIMIT = 0.25  # above it, a model's rewards rest mostly on answers cut unfinished


def truncation_reading(name: str, share: float, max_new_tokens: int) -> str | None:
    """A flag for a model whose answers were mostly cut (None when at most `TRUNCATED_SHARE_LIMIT`)."""
    if share <= TRUNCATED_SHARE_LIMIT:
        return None
    return (
        f"{name}: {share:.0%} of its answers did not end within {max_new_tokens} new tokens (above "
        f"{TRUNCATED_SHARE_LIMIT:.0%}): its rewards, and every gain measured against it, rest largely on cut "
        "answers (scored as open turns); raise max_new_tokens or ask for shorter answers before reading them."
    )


def kl_reading(name: str, kl: float, low: float, high: float) -> str:
    where = "inside" if low <= kl <= high else ("above" if kl > high else "below")
    return (
        f"{name}: per-token KL to the base model on the evaluation prompts is {kl:.4f}, {where} the {low}-{high} band."
    )


def training_cost(run: str) -> dict:
    """Mean seconds per iteration (online methods) or per step (DPO) and peak RSS of a training run."""
    try:
        metrics = read_metrics(run)
    except UserInputError:
        return {}
    cost = {}
    for column, key in (("time/iteration_s", "seconds_per_iteration"), ("time/step_s", "seconds_per_step")):
        if column in metrics:
            cost[key] = float(metrics[column].dropna().mean())
    if "perf/peak_rss_gb" in metrics:
        cost["peak_rss_gb"] = float(metrics["perf/peak_rss_gb"].dropna().max())
    return {k: v for k, v in cost.items() if not math.isnan(v)}


def summarise(records: pd.DataFrame, s: EvalSettings, judges: list[Judge]) -> dict[str, dict]:
    """Per model: mean rewards and, for policies, gains (raw and length-controlled) under each judge,
    all on per-prompt means (one value per prompt and model, whatever `samples_per_prompt`)."""
    summary, ci = {}, {"n_resamples": s.bootstrap_resamples, "seed": s.seed}
    scores = records[["model", "prompt_id"]].copy()
    base_rows = (records.model == BASE).to_numpy()
    for j in judges:
        scores[j.role] = records[f"{j.role}_reward"].to_numpy(float)
        scores[f"{j.role}_residual"] = length_residuals(records[f"{j.role}_reward"], records.length, base_rows)
    per_prompt = scores.groupby(["model", "prompt_id"], sort=False).mean()
    base, base_length = per_prompt.loc[BASE], records[records.model == BASE].length.mean()
    for model, group in records.groupby("model", sort=False):
        prompts = per_prompt.loc[model].reindex(base.index)
        entry = {
            "mean_length": float(group.length.mean()),
            "truncated_share": float(group.truncated.mean()),
            "repetition": float(group.repetition.mean()),
        }
        for judge in judges:
            key = "" if judge.role == "training" else "judge_"
            values, residuals = prompts[judge.role].to_numpy(), prompts[f"{judge.role}_residual"].to_numpy()
            entry[f"{key}mean_reward"] = asdict(bootstrap_mean_ci(values, **ci))
            if model != BASE:
                entry[f"{key}reward_gain"] = asdict(paired_gain_ci(values, base[judge.role].to_numpy(), **ci))
                entry[f"{key}length_controlled_gain"] = asdict(
                    paired_gain_ci(residuals, base[f"{judge.role}_residual"].to_numpy(), **ci)
                )
                entry[f"{key}win_rate"] = win_rate(values, base[judge.role].to_numpy())
        if model != BASE:
            entry["length_change"] = float(group.length.mean() - base_length)
            entry["kl_to_base"] = float(group.kl_sum.sum() / max(group.length.sum(), 1))
            entry["training"] = training_cost(s.policies[model])
        summary[model] = entry
    return summary


# ---------------------------------------------------------------------------- the computation


def evaluate(s: EvalSettings) -> EvalResult:
    """Generate, measure KL, score; every input is read and checked before the long generation."""
    prompt_rows = load_eval_prompts(s)
    prompts = [row["prompt"] for row in prompt_rows]
    texts = [prompt_text(p) for p in prompts]
    paths = {"training": s.reward_model, "judge": s.judge_reward_model}
    judges = [
        Judge(role, path, scoring_settings(path, s.reward_max_length), reward_model_overlap(path, prompt_rows))
        for role, path in paths.items()
        if path
    ]
    for judge in judges:
        # a missing or offline reward model stops here, not after generation; errors name the option given
        load_tokenizer(judge.path, option="--reward_model" if judge.role == "training" else "--judge_reward_model")
    for run in s.policies.values():
        policy_export(run)
    system_prompt = policies_system_prompt(s)
    kl_curves = {}
    for name, run in s.policies.items():
        try:
            kl_curves[name] = ppo_curves(run)
        except UserInputError:  # DPO and other offline methods log no KL series
            pass

    base_model, base_tokenizer = load_causal_lm(s.base_model), load_tokenizer(s.base_model, padding_side="left")
    require_tokenizer_fits(base_model, base_tokenizer, BASE)
    require_system_prompt_renders(base_tokenizer, system_prompt)
    rng = np.random.default_rng(s.human_eval_seed)
    human_ids = sorted(rng.choice(len(texts), size=min(s.human_eval_prompts, len(texts)), replace=False).tolist())
    asked = [(i, k) for i in range(len(prompts)) for k in range(s.samples_per_prompt)]  # (prompt, sample)
    asked_prompts = [prompts[i] for i, _ in asked]
    records, human = [], {}
    for name in [BASE, *s.policies]:
        model, tokenizer = (base_model, base_tokenizer) if name == BASE else load_policy(s.base_model, s.policies[name])
        require_tokenizer_fits(model, tokenizer, name)
        # k1 KL on the policy's own samples, both log-probs at the sampling temperature
        responses, token_ids, own = generate_responses(
            model,
            tokenizer,
            asked_prompts,
            s.max_new_tokens,
            s.temperature,
            s.seed,
            s.generation_batch_size or s.batch_size,
            s.max_prompt_length,
            desc=f"generating ({name})",
            return_logprobs=True,
            system_prompt=system_prompt,
        )
        kl_sums = [0.0] * len(asked)
        if name != BASE:
            ref = response_logprobs(
                base_model,
                base_tokenizer,
                asked_prompts,
                token_ids,
                s.temperature,
                s.max_prompt_length,
                s.batch_size,
                system_prompt,
            )
            kl_sums = [float((a - b).sum()) for a, b in zip(own, ref)]
            del model
            gc.collect()
        for (i, k), response, ids, kl_sum in zip(asked, responses, token_ids, kl_sums):
            records.append(
                {
                    "model": name,
                    "prompt_id": i,
                    "sample": k,
                    "prompt": texts[i],
                    "response": response,
                    "length": len(ids),
                    "truncated": is_truncated(ids, s.max_new_tokens),
                    "repetition": repetition_rate(ids),
                    "kl_sum": kl_sum,
                }
            )
        human[name] = [{"prompt": texts[i], "response": responses[i * s.samples_per_prompt]} for i in human_ids]
    del base_model
    records = pd.DataFrame(records)
    for judge in judges:
        records[f"{judge.role}_reward"] = score_with(judge, prompts, records, s)
    summary = summarise(records, s, judges)
    readings = [
        interpret_kl(c["objective/kl_per_token"].tolist(), s.kl_low, s.kl_high, name) for name, c in kl_curves.items()
    ]
    for name in s.policies:
        entry = summary[name]
        judge = Interval(**entry["judge_reward_gain"]) if "judge_reward_gain" in entry else None
        readings.append(
            reward_hacking_reading(
                name, Interval(**entry["reward_gain"]), judge, Interval(**entry["length_controlled_gain"])
            )
        )
        readings.append(kl_reading(name, entry["kl_to_base"], s.kl_low, s.kl_high))
    readings += [
        line
        for name, entry in summary.items()
        if (line := truncation_reading(name, entry["truncated_share"], s.max_new_tokens))
    ]
    return EvalResult(s, records, judges, summary, kl_curves, readings, human, system_prompt)


def score_with(judge: Judge, prompts: list, records: pd.DataFrame, s: EvalSettings) -> list[float]:
    """Every model's responses scored by one reward model (loaded for this alone), in one pass so
    that responses of similar length share batches whichever model wrote them; a response cut at
    `max_new_tokens` is scored as the open turn it is (`lit_rlhf.text.render_prompt_response`)."""
    tokenizer = load_tokenizer(judge.path, padding_side="right")
    model = load_sequence_scorer(judge.path, tokenizer.pad_token_id, trained_head=True).eval()
    require_tokenizer_fits(model, tokenizer, f"the {judge.role} reward model '{judge.path}'")
    scores = score_responses(
        model,
        tokenizer,
        [prompts[i] for i in records.prompt_id],
        records.response.tolist(),
        judge.scoring["max_length"],
        s.batch_size,
        judge.scoring["min_prompt_tokens"],
        ended=(~records.truncated.astype(bool)).tolist(),
    ).cpu()
    broken = (
        pd.Series((~torch.isfinite(scores)).numpy()).groupby(records.model.to_numpy(), sort=False).agg(["sum", "size"])
    )
    if broken["sum"].any():
        name, (count, total) = next((name, row) for name, row in broken.iterrows() if row["sum"])
        raise NonFiniteError(
            f"The {judge.role} reward model '{judge.path}' gave NaN/inf rewards to {count} of the {total} "
            f"responses of {name}: its weights are broken (a diverged reward-model run?). Evaluate with the best "
            "reward-model export, or retrain it with a lower learning rate."
        )
    return scores.tolist()
