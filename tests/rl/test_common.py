"""The RL maths has one home per idea: helpers shared by the methods live in `lit_rlhf.rl.common`."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from lit_rlhf.rl.common import k3_kl, kl_estimate

RL = Path(__file__).resolve().parents[2] / "lit_rlhf" / "rl"


def test_no_function_of_the_rl_maths_is_defined_twice():
    homes = defaultdict(list)
    for file in sorted(RL.glob("*.py")):
        for node in ast.parse(file.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                homes[node.name].append(file.name)
    assert {name: files for name, files in homes.items() if len(files) > 1} == {}


def test_ppo_k3_estimate_is_grpo_kl_term_to_the_bit():
    torch.manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(64, 32) * 5, -torch.rand(64, 32) * 5
    assert torch.equal(kl_estimate(logprobs, ref_logprobs, "k3"), k3_kl(logprobs, ref_logprobs))


def test_offline_dpo_does_not_load_the_online_rl_base():
    code = "import sys, lit_rlhf.modules.dpo; print(sorted(m for m in sys.modules if m.startswith('lit_rlhf.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "lit_rlhf.models.policy" in loaded and "lit_rlhf.modules.online" not in loaded
