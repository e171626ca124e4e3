"""Renderers of an `EvalResult`: files (rewards.csv, summary.json, generations for rating, kl.png),
`report.md`, and an offline W&B run. They compute nothing new."""

import json
from pathlib import Path

from lit_rlhf.eval import human_ratings
from lit_rlhf.eval.kl_monitor import plot_kl
from lit_rlhf.eval.rlhf import BASE, TRUNCATED_SHARE_LIMIT, EvalResult, Judge
from lit_rlhf.eval.stats import Interval
from lit_rlhf.tables import markdown_table


def _interval(entry: dict, key: str) -> str:
    return str(Interval(**entry[key])) if key in entry else "—"


def reward_table(result: EvalResult) -> tuple[list[str], list[list]]:
    judged = any(j.role == "judge" for j in result.judges)
    columns = [
        "Model",
        "Training-RM reward [95% CI]",
        "Gain [95% CI]",
        "Truncated share",
        "Length-controlled gain",
        "Win rate",
    ]
    if judged:
        columns += ["Judge-RM gain [95% CI]", "Judge length-controlled gain"]
    rows = []
    for model, e in result.summary.items():
        truncated = f"{e['truncated_share']:.0%}" + (" (!)" if e["truncated_share"] > TRUNCATED_SHARE_LIMIT else "")
        row = [
            model,
            _interval(e, "mean_reward"),
            _interval(e, "reward_gain"),
            truncated,
            _interval(e, "length_controlled_gain"),
            f"{e['win_rate']:.0%}" if "win_rate" in e else "—",
        ]
        if judged:
            row += [_interval(e, "judge_reward_gain"), _interval(e, "judge_length_controlled_gain")]
        rows.append(row)
    return columns, rows


def behaviour_table(result: EvalResult) -> tuple[list[str], list[list]]:
    columns = [
        "Model",
        "KL to base (per token)",
        "Mean length (tokens)",
        "Length change",
        "Truncated share",
        "Repetition (3-gram)",
        "Training s/iteration (DPO: s/step)",
        "Training peak RSS (GB)",
    ]
    rows = []
    for model, e in result.summary.items():
        cost = e.get("training", {})
        rows.append(
            [
                model,
                f"{e['kl_to_base']:.4f}" if "kl_to_base" in e else "—",
                f"{e['mean_length']:.1f}",
                f"{e['length_change']:+.1f}" if "length_change" in e else "—",
                f"{e['truncated_share']:.0%}",
                f"{e['repetition']:.3f}",
                seconds_text(cost),
                f"{cost['peak_rss_gb']:.1f}" if "peak_rss_gb" in cost else "—",
            ]
        )
    return columns, rows


def answers(count: int) -> str:
    return "one sampled answer" if count == 1 else f"{count} sampled answers"


def system_text(system_prompt: str | None) -> str:
    if system_prompt is None:
        return "under the chat template's default system turn"
    return (
        f"under the policies' system instruction {system_prompt!r} (the base model's too; the reward models "
        "do not see it)"
    )


def seconds_text(cost: dict) -> str:
    if "seconds_per_iteration" in cost:
        return f"{cost['seconds_per_iteration']:.1f}"
    return f"{cost['seconds_per_step']:.1f} per step" if "seconds_per_step" in cost else "—"


def overlap_text(judge: Judge) -> str:
    who = f"the {judge.role} reward model"
    if judge.overlap is None:
        return (
            f"Overlap with {who}'s data unknown: its export records no training data "
            "(lit_rlhf_export.json predates the record, or the model comes from elsewhere)."
        )
    if judge.overlap == 0:
        return f"0 evaluation prompts share a message tree with {who}'s training/validation data."
    return (
        f"**Warning: {judge.overlap} evaluation prompts share a message tree with {who}'s "
        "training/validation data**, so their rewards are not on unseen data (re-run PPO against this "
        "reward model: its data module keeps them out of the evaluation prompts)."
    )


def write_outputs(result: EvalResult, out: Path) -> Path:
    """All files of the evaluation folder, `report.md` last; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    result.records.to_csv(out / "rewards.csv", index=False)
    (out / human_ratings.GENERATIONS_FILE).write_text(
        json.dumps(result.human, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    kl_png = (
        plot_kl(result.kl_curves, out / "kl.png", result.settings.kl_low, result.settings.kl_high)
        if result.kl_curves
        else None
    )
    summary = {
        **result.summary,
        "readings": result.readings,
        "num_prompts": int(result.records.prompt_id.nunique()),
        "system_prompt": result.system_prompt,
    }
    for judge in result.judges:  # flat keys: the dict entries of summary.json are the models
        summary.update({f"{judge.role}_reward_{key}": value for key, value in judge.scoring.items()})
        summary[f"prompts_seen_by_{judge.role}_reward_model"] = judge.overlap
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return write_report(result, out, kl_png, human_ratings.summarize(out))


def write_report(result: EvalResult, out: Path, kl_png: Path | None, human_md: Path) -> Path:
    s, records = result.settings, result.records
    sections = ["# RLHF evaluation report", ""]
    if s.data_note:
        sections += [f"Data: {s.data_note}", ""]
    preview = Path(s.reward_model_run or Path(s.reward_model).parent) / "preprocessed_preview.md"
    if preview.exists():
        sections += ["## Reward model: preprocessed inputs (first rows)", "", preview.read_text(encoding="utf-8"), ""]
    judges = "; ".join(
        f"{j.role} `{j.path}` reading at most {j.scoring['max_length']} tokens with at least "
        f"{j.scoring['min_prompt_tokens']} for the prompt ({j.scoring['scoring_source']})"
        for j in result.judges
    )
    sections += [
        f"## Reward on {records.prompt_id.nunique()} unseen prompts",
        "",
        f"Same seed ({s.seed}) and decoding for every model: temperature {s.temperature}, top_k 0, top_p 1, "
        f"up to {s.max_new_tokens} new tokens, {answers(s.samples_per_prompt)} per prompt, "
        f"{system_text(result.system_prompt)}. Reward models: {judges}. "
        "The judge (when given) was trained on other message trees and never optimised against. Intervals: 95% "
        "percentile bootstrap over prompts (paired for gains) of each prompt's mean over its answers; ties count "
        "half in win rates. Length-controlled gain: the gain of the rewards' residuals after the base model's "
        "straight-line fit of reward on response length (slope b over the base model's answers alone: the gain less "
        "b x the length change, whichever other policies are evaluated). KL to base: per-token k1 estimate on each "
        "policy's own samples at the sampling temperature. Truncated share: answers that did not end (no EOS) within "
        f"{s.max_new_tokens} new tokens. The reward models read such an answer as an open assistant turn, without "
        "the end-of-turn tokens a finished answer ends with; gains are computed on all answers, cut ones included. "
        f"(!) marks a share above {TRUNCATED_SHARE_LIMIT:.0%}, flagged in the readings.",
        "",
        *[overlap_text(j) for j in result.judges],
        "",
        markdown_table(*reward_table(result)),
        "",
        markdown_table(*behaviour_table(result)),
        "",
        "Readings:",
        "",
        *[f"- {line}" for line in result.readings],
        "",
    ]
    if kl_png:
        sections += ["## KL divergence vs training step", "", f"![KL vs step]({kl_png.name})", ""]
    sections += [
        "## Manual evaluation",
        "",
        human_md.read_text(encoding="utf-8"),
        "Give the ratings with `python -m lit_rlhf.eval.human_ratings rate --eval_dir "
        f"{out}` (resumable), then rebuild this report or read `human_ratings.md`.",
        "",
    ]
    sample = records[(records.prompt_id < 3) & (records["sample"] == 0)]
    sections += [
        "## Sample generations",
        "",
        markdown_table(
            ["Prompt", "Model", "Reward", "Response"],
            [[r.prompt, r.model, f"{r.training_reward:.3f}", r.response] for r in sample.itertuples()],
        ),
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(sections), encoding="utf-8")
    return report


def log_to_wandb(result: EvalResult, out: Path, report: Path) -> None:
    import wandb

    s = result.settings
    run = wandb.init(project=s.wandb_project, group="evaluation", tags=["evaluation"], dir=str(out), mode=s.wandb_mode)
    columns, rows = reward_table(result)
    behaviour_columns, behaviour_rows = behaviour_table(result)
    kl_png = out / "kl.png"
    run.log(
        {
            "eval/reward_table": wandb.Table(columns=columns, data=rows),
            "eval/behaviour_table": wandb.Table(columns=behaviour_columns, data=behaviour_rows),
            "eval/generations": wandb.Table(dataframe=result.records),
            **({"eval/kl_plot": wandb.Image(str(kl_png))} if kl_png.exists() else {}),
        }
    )
    run.summary.update(
        {
            f"{model}/{key}": value
            for model, e in result.summary.items()
            if model != BASE
            for key, value in e.items()
            if isinstance(value, float)
        }
    )
    run.save(str(report), base_path=str(out))
    run.finish()
