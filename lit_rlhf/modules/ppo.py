"""PPO fine-tuning of a causal LM against a frozen reward model (RLHF), full or LoRA.

One module and one switch: `lora: null` trains every policy weight; with `lora` set (the override
configs/lora/ppo.yaml), only the q_proj/v_proj adapters train (see `lit_rlhf.modules.online` for what
all online methods share).
The critic starts from the reward model. Metric names follow TRL's PPO trainer (`objective/kl`,
`objective/scores`, `policy/approxkl_avg`, ...); its `val/*` metrics describe the value function
and the responses of each iteration, they are not validation metrics.
"""

import time

import torch
from lightning.pytorch.cli import OptimizerCallable
from peft import PeftModel, get_peft_model
from pydantic import NonNegativeInt, PositiveInt

from lit_rlhf.errors import UserInputError
from lit_rlhf.models.hf import DEFAULT_MODEL, load_sequence_scorer, load_tokenizer
from lit_rlhf.models.policy import LoraSettings, count_trainable
from lit_rlhf.modules.online import OnlineRLModule
from lit_rlhf.rl.common import masked_whiten
from lit_rlhf.rl.ppo import gae, ppo_policy_loss, ppo_value_loss, token_rewards


class PPOModule(OnlineRLModule):
    """PPO with a critic: each training step is one iteration of rollout, scoring and clipped updates.

    An iteration rolls out a batch of prompts, scores it, then runs `ppo_epochs` passes of clipped
    policy/value updates over it in mini-batches.

    Args:
        model_name_or_path: the policy's starting model (hub id, local folder or `embedded:smollm2`).
        reward_model_path: the frozen reward-model folder exported by the reward-model stage.
        value_model_path: where the critic starts (default: the reward model); its tokenizer must be
            the policy's (the critic reads the policy's ids), else the run is refused.
        lora: LoRA settings for the policy; None trains all weights (the "full" variant).
        critic_lora: LoRA settings for the critic (its scalar head stays fully trainable); None
            trains all its weights.
        forward_batch_size: micro-batch for every forward and backward pass.
        generation_batch_size: prompts per `generate` call (default: the whole rollout batch).
            Sampling a token costs about the same for 4 rows as for 64 on a CPU (overhead-bound),
            and no (B, T, V) logits are kept, so larger is faster until memory runs out.
        mini_batch_size: prompts per optimizer step (default: the whole rollout batch).
        kl_target: per-token KL the adaptive controller steers to; None keeps `init_kl_coef` fixed.
        kl_horizon_fraction: the controller's horizon as a share of the run's rollout samples
            (`lit_rlhf.rl.common.kl_horizon_for_run`): 0.04 lets `kl_coef` double within 14% of the run.
        missing_eos_penalty: subtracted from the score of responses that never emit EOS.
        reward_max_length: override of the max length the reward model was trained with (read
            from its export record; an override that differs is printed as a warning).
        system_prompt: a system instruction in front of every prompt the policy answers (e.g. one
            asking for concise answers); the CLI passes it to the data module, the export records it
            and the evaluation uses it for this policy and the base model. None: the template's default.
            The reward model scores the user's prompt and the answer, without it.
    """

    method = "PPO"

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        reward_model_path: str = "runs/reward_model/reward_model",
        value_model_path: str | None = None,
        lora: LoraSettings | None = None,
        critic_lora: LoraSettings | None = None,
        policy_optimizer: OptimizerCallable = torch.optim.AdamW,
        value_optimizer: OptimizerCallable = torch.optim.AdamW,
        forward_batch_size: PositiveInt = 16,
        generation_batch_size: PositiveInt | None = None,
        mini_batch_size: PositiveInt | None = None,
        ppo_epochs: PositiveInt = 4,
        max_new_tokens: PositiveInt = 128,
        temperature: float = 0.7,
        missing_eos_penalty: float | None = None,
        kl_estimator: str = "k1",
        init_kl_coef: float = 0.05,
        kl_target: float | None = 0.05,
        kl_horizon_fraction: float = 0.04,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        max_grad_norm: float = 1.0,
        reward_max_length: PositiveInt | None = None,
        sample_every_n_steps: NonNegativeInt = 5,
        trust_remote_code: bool = False,
        system_prompt: str | None = None,
    ):
        # as stored in checkpoints (plain types load with weights_only=True)
        lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        critic_lora = LoraSettings(**critic_lora) if isinstance(critic_lora, dict) else critic_lora
        if kl_estimator not in {"k1", "k3"}:
            raise UserInputError(f"kl_estimator must be 'k1' or 'k3', not '{kl_estimator}'.")
        super().__init__(
            model_name_or_path,
            reward_model_path,
            lora,
            forward_batch_size,
            generation_batch_size,
            max_new_tokens,
            temperature,
            missing_eos_penalty,
            init_kl_coef,
            kl_target,
            kl_horizon_fraction,
            reward_max_length,
            trust_remote_code,
            system_prompt=system_prompt,
        )
        self.save_hyperparameters(ignore=["policy_optimizer", "value_optimizer"])
        self.policy_optimizer, self.value_optimizer = policy_optimizer, value_optimizer
        self._require_critic_reads_policy_ids(value_model_path, trust_remote_code)
        critic = load_sequence_scorer(
            value_model_path or reward_model_path, self.tokenizer.pad_token_id, trust_remote_code
        )
        self.critic = get_peft_model(critic, critic_lora.config("SEQ_CLS")) if critic_lora else critic
        self.trainable_params["critic"] = count_trainable(self.critic)
        self.describe_trainable()

    def _require_critic_reads_policy_ids(self, value_model_path: str | None, trust_remote_code: bool) -> None:
        """The critic reads the policy's token ids, so its tokenizer must be the policy's. Scoring
        re-tokenizes text for the reward model, the critic cannot: refused rather than read garbage.
        (Refused, not silently initialised from the policy: the reward model is the usual start.)"""
        if value_model_path is None:
            critic_tokenizer, option = self.reward_tokenizer, "model.reward_model_path"
        else:
            option = "model.value_model_path"
            critic_tokenizer = load_tokenizer(value_model_path, trust_remote_code=trust_remote_code, option=option)
        if critic_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise UserInputError(
                f"The PPO critic starts from '{critic_tokenizer.name_or_path}' ({option}), whose tokenizer differs "
                f"from the policy's ('{self.tokenizer.name_or_path}'), but the critic reads the policy's token ids. "
                "Set model.value_model_path to a model with the policy's tokenizer (e.g. the policy itself, "
                "--model.value_model_path <model_name_or_path>), or train the reward model from the policy's model."
            )

    def _values(self, sequences, attention_mask, response_length: int) -> torch.Tensor:
        critic = self.critic.get_base_model() if isinstance(self.critic, PeftModel) else self.critic
        backbone = getattr(critic, critic.base_model_prefix)
        hidden = backbone(
            input_ids=sequences, attention_mask=attention_mask, position_ids=self._position_ids(attention_mask)
        ).last_hidden_state
        return critic.score(hidden[:, -response_length - 1 : -1]).squeeze(-1).float()

    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        """Sample responses, then the reference log-probs, the critic's values and the scores."""
        ro = self.sample(batch)
        ro["ref_logprobs"] = self.reference_logprobs(ro)
        self.critic.eval()
        ro["values"] = torch.zeros_like(ro["mask"])
        all_rows = torch.arange(ro["mask"].size(0), device=ro["mask"].device)
        for rows, columns, width in self._micro_batches(all_rows, ro["attention_mask"], ro["query_width"]):
            ro["values"][rows, :width] = self._values(
                ro["sequences"][rows, columns], ro["attention_mask"][rows, columns], width
            )
        ro["scores"] = self.scores(ro)
        return ro

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        started = time.perf_counter()
        ro = self.rollout(batch)
        rollout_seconds = time.perf_counter() - started
        mask = ro["mask"]
        kl, kl_per_token = self.kl_penalty(ro, batch_idx, hp.kl_estimator)
        rewards, non_score_reward = token_rewards(ro["scores"], kl, mask, self.kl_controller.value)
        advantages, returns = gae(rewards, ro["values"], mask, hp.gamma, hp.lam)
        advantages = masked_whiten(advantages, mask, sum_across=self._sum_across_ranks)
        stats = self._optimise(ro, advantages, returns)
        metrics = {
            "objective/non_score_reward": non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": (ro["scores"] + non_score_reward.sum(1)).mean(),
            **stats,
        }
        self.log_iteration(ro, kl, kl_per_token, started, rollout_seconds, metrics, batch_idx)
        self.update_kl_controller(kl_per_token, mask.size(0))

    def _optimise(self, ro: dict, advantages: torch.Tensor, returns: torch.Tensor) -> dict:
        """`ppo_epochs` passes of clipped policy and value updates (losses: token means over each
        mini-batch, see `OnlineRLModule.update`)."""
        hp = self.hparams
        self.policy.eval()  # no dropout, as in the rollout (see lit_rlhf.modules.online)
        self.critic.eval()

        def micro_loss(rows, columns, width, n_sequences, n_tokens):
            kept = (rows, slice(0, width))
            m = ro["mask"][kept]
            new_logprobs = self.policy_logprobs(ro, rows, columns, width)
            pl = ppo_policy_loss(new_logprobs, ro["logprobs"][kept], advantages[kept], m, hp.clip_range, n_tokens)
            new_values = self._values(ro["sequences"][rows, columns], ro["attention_mask"][rows, columns], width)
            vl, v_clipfrac = ppo_value_loss(
                new_values, ro["values"][kept], returns[kept], m, hp.clip_range_value, n_tokens
            )
            token_mean = n_tokens / m.sum().clamp(min=1)  # the micro-batch's own token means, for the statistics
            stats = {
                "policy/approxkl_avg": pl.approxkl,
                "policy/clipfrac_avg": pl.clipfrac,
                "loss/policy_avg": pl.loss * token_mean,
                "loss/value_avg": vl * token_mean,
                "val/clipfrac_avg": v_clipfrac,
                "val/ratio": pl.ratio,
            }
            return pl.loss + vl, stats

        return self.update(ro, hp.ppo_epochs, hp.mini_batch_size, micro_loss, hp.max_grad_norm)

    def configure_optimizers(self):
        policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        return self.policy_optimizer(policy_params), self.value_optimizer(critic_params)
