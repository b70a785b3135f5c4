"""LoRA through PEFT (docs/algorithm.md §4): only adapter weights train; the frozen teacher and the trust-region reference
are the base model with the adapter disabled, the EMA teacher a second adapter; never a copy of the base weights."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_OVERRIDES
from toy_envs import ParityEnv, ParityEnvConfig

from sdpo import SDPOTrainer, load_config
from sdpo.batch import build_model_inputs
from sdpo.config import ConfigError, LoRAConfig, ModelConfig, TeacherConfig
from sdpo.models import load_model, response_hidden_states
from sdpo.teacher import Teacher
from sdpo.teacher.weights import EMA_ADAPTER

LORA = ["model.lora.enabled=true", "model.lora.r=4"]


class InlineParityEnv(ParityEnv):
    scoring_mode = "inline"  # no scoring worker processes to start


@pytest.fixture()
def policy(tiny_path):
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path="tiny", lora=LoRAConfig(enabled=True, r=4)), tiny_path)
    with torch.no_grad():  # a trained-looking adapter (a fresh one has B = 0 and changes nothing)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def inputs():
    return build_model_inputs([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], pad_id=2)


def base_hidden(tiny_path, x):
    with torch.no_grad():
        return response_hidden_states(load_model(ModelConfig(name_or_path="tiny"), tiny_path), x)


def adapter_params(model, adapter="default"):
    return {n: p for n, p in model.named_parameters() if f".{adapter}." in n}


def numel(params):
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("kind", ["live", "frozen", "ema", "trust_region"])
def test_teacher_holds_no_copy_of_the_base_weights(policy, kind):
    base_numel = numel(p for p in policy.parameters() if not p.requires_grad)
    teacher = Teacher(TeacherConfig(kind=kind), policy)
    assert teacher.model is None
    owned = teacher.owned_parameters()
    # The EMA teacher owns exactly one adapter's worth of tensors, the others nothing.
    assert numel(owned) == (numel(adapter_params(policy).values()) if kind == "ema" else 0)
    assert numel(owned) < 0.1 * base_numel
    assert not any(p.requires_grad for p in owned)


@pytest.mark.parametrize("kind", ["frozen", "trust_region"])
def test_frozen_teacher_and_reference_are_the_base_model(policy, tiny_path, kind):
    teacher = Teacher(TeacherConfig(kind=kind, trust_region_mix=0.3), policy)
    x = inputs()
    policy.train()
    trainable_before = [n for n, p in policy.named_parameters() if p.requires_grad]
    scored = teacher.features(policy, x)
    base = base_hidden(tiny_path, x)
    torch.testing.assert_close(scored.features[0].values_BRX, base)
    # Afterwards the adapter is on again, trainable, and the policy back in train mode.
    assert policy.training
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == trainable_before
    with torch.no_grad():
        live = response_hidden_states(policy.eval(), x)
    assert not torch.allclose(live, base)
    if kind == "trust_region":
        assert scored.weights == pytest.approx([0.7, 0.3])
        torch.testing.assert_close(scored.features[1].values_BRX, live)


def test_ema_teacher_is_a_second_adapter_updated_by_the_exact_lerp(policy):
    teacher = Teacher(TeacherConfig(kind="ema", update_rate=0.25), policy)
    trained, ema = adapter_params(policy), adapter_params(policy, EMA_ADAPTER)
    assert len(ema) == len(trained) > 0
    for name, p in ema.items():  # starts as a copy of the trained adapter
        assert torch.equal(p, trained[name.replace(EMA_ADAPTER, "default")])
    before = {n: p.detach().clone() for n, p in ema.items()}
    with torch.no_grad():
        for p in trained.values():
            p.add_(torch.randn_like(p) * 0.1)
    teacher.update(policy)
    for name, p in ema.items():
        live = trained[name.replace(EMA_ADAPTER, "default")]
        torch.testing.assert_close(p, 0.75 * before[name] + 0.25 * live)

    # The teacher forward runs the EMA adapter: the same as the policy with the EMA weights in its own adapter.
    x = inputs()
    hidden = teacher.features(policy, x).features[0].values_BRX
    assert policy.active_adapter == "default"
    assert all(p.requires_grad for p in trained.values()) and not any(p.requires_grad for p in ema.values())
    saved = {n: p.detach().clone() for n, p in trained.items()}
    with torch.no_grad():
        for name, p in trained.items():
            p.copy_(ema[name.replace("default", EMA_ADAPTER)])
        expected = response_hidden_states(policy.eval(), x)
        for name, p in trained.items():
            p.copy_(saved[name])
    torch.testing.assert_close(hidden, expected)


def test_lora_training_changes_only_adapter_weights_and_checkpoints_the_adapter(tmp_path, tiny_path):
    config = load_config([*TINY_OVERRIDES, *LORA, "model.gradient_checkpointing=true", "algorithm.teacher.kind=ema",
                          "algorithm.teacher.update_rate=0.5", f"trainer.output_dir={tmp_path / 'run'}"])
    trainer = SDPOTrainer(config, env=InlineParityEnv(ParityEnvConfig()))
    policy = trainer.learner.unwrapped
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    metrics = trainer.training_step().metrics
    assert metrics["distill/loss"] > 0 and metrics["optim/skipped_steps"] == 0
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the step must move the adapter"
    assert all(".lora_" in n for n in changed), sorted(changed)[:5]
    assert any(f".{EMA_ADAPTER}." in n for n in changed) and any(".default." in n for n in changed)
    assert {id(p) for p in trainer.dist.trainable} == {id(p) for n, p in policy.named_parameters() if ".default." in n}

    assert trainer.step == 1
    path = trainer.save()
    assert (path / "adapter_model.safetensors").exists() and (path / "adapter_config.json").exists()
    assert not (path / "model.safetensors").exists() and not (path / EMA_ADAPTER).exists()
    assert (path / "adapter_model.safetensors").stat().st_size < 0.1 * (tiny_path / "model.safetensors").stat().st_size

    # Resume restores the trained and the EMA adapter; eval loads the adapter onto its base and merges it.
    config = load_config([*TINY_OVERRIDES, *LORA, "algorithm.teacher.kind=ema", "trainer.resume=auto",
                          f"trainer.output_dir={tmp_path / 'run'}"])
    resumed = SDPOTrainer(config, env=InlineParityEnv(ParityEnvConfig()))
    assert resumed.step == 1
    for n, p in resumed.learner.unwrapped.named_parameters():
        assert torch.equal(p, dict(policy.named_parameters())[n]), n
    merged = load_model(ModelConfig(name_or_path=str(path)), path).eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(response_hidden_states(merged, x), response_hidden_states(policy.eval(), x),
                                   rtol=1e-4, atol=1e-5)


def test_kl_reference_with_lora_is_the_adapter_disabled(tmp_path):
    config = load_config([*TINY_OVERRIDES, *LORA, "algorithm=grpo", "algorithm.policy.kl_coef=0.1",
                          f"trainer.output_dir={tmp_path / 'run'}"])
    trainer = SDPOTrainer(config, env=InlineParityEnv(ParityEnvConfig()))
    assert trainer.learner.reference is not None and trainer.learner.reference.model is None  # no copy: the adapter disabled
    metrics = trainer.training_step().metrics
    assert "policy/kl_ref" in metrics and metrics["policy/kl_ref"] >= 0


def test_lora_may_not_adapt_the_output_head():
    with pytest.raises(ConfigError, match="lm_head"):
        LoRAConfig(enabled=True, target_modules=["q_proj", "lm_head"])
