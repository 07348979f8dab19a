"""Auxiliary routing losses: router similarity, balance, z-loss, per-layer regularization, training step.

Letters (docs/method/README.md): B images, L tokens per image, N = B*L tokens, E experts; P = softmax(logits)
over experts in the formulas, target_dim = p*p*C target values per token.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
from conftest import run_gloo_workers

from racedit.config import LossConfig, SampleConfig
from racedit.data.codec import IdentityCodec
from racedit.diffusion.draws import MicroBatchDraws
from racedit.diffusion.objectives import DDPMObjective
from racedit.models import create_model
from racedit.models.losses import (
    auxiliary_losses,
    balance_loss,
    patchify_target,
    per_layer_regularization,
    router_similarity_loss,
    z_loss,
)
from racedit.models.moe import MoEFeedForward, update_thresholds
from racedit.models.records import ForwardRecord
from racedit.training.objective_step import training_losses

TINY_MOE = dict(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2, learn_sigma=False)


def tiny_moe(**overrides):
    torch.manual_seed(0)
    return create_model("RaceDiT-S/2-2in8", **{**TINY_MOE, **overrides})


def pair_mask(E: int, pairs: list[tuple[int, ...]]) -> torch.Tensor:
    """One token per entry of `pairs`, routed to exactly those experts: (len(pairs), E) bool."""
    mask = torch.zeros(len(pairs), E, dtype=torch.bool)
    for n, experts in enumerate(pairs):
        mask[n, list(experts)] = True
    return mask


def rsl_direct(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """The router similarity loss written out with loops in float64 (independent of the implementation)."""
    z = logits.double().tolist()
    m = mask.tolist()
    N, E = len(z), len(z[0])
    p = []
    for row in z:
        top = max(row)
        ex = [math.exp(v - top) for v in row]
        p.append([v / sum(ex) for v in ex])
    p_corr = [[sum(p[n][i] * p[n][j] for n in range(N)) for j in range(E)] for i in range(E)]
    m_corr = [[sum(float(m[n][i] and m[n][j]) for n in range(N)) for j in range(E)] for i in range(E)]
    diag_sum = sum(m_corr[i][i] for i in range(E))
    off_sum = sum(m_corr[i][j] for i in range(E) for j in range(E) if i != j)
    total = 0.0
    for i in range(E):
        for j in range(E):
            if i == j:
                w = E * m_corr[i][i] / diag_sum
            else:
                w = (E * E - E) * m_corr[i][j] / off_sum
            total += w * p_corr[i][j]
    return total / N


# --- router similarity loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("E,repeat", [(4, 1), (8, 3)])
def test_router_similarity_is_one_for_uniform_usage(E, repeat):
    # every pair of experts co-selected equally often (so every expert equally loaded), any router output
    mask = pair_mask(E, list(itertools.combinations(range(E), 2)) * repeat)
    logits = torch.randn(mask.shape[0], E, generator=torch.Generator().manual_seed(E), dtype=torch.float64) * 3
    assert abs(router_similarity_loss(logits, mask).item() - 1.0) < 1e-6
    assert abs(router_similarity_loss(logits.float(), mask).item() - 1.0) < 1e-6
    everything = torch.ones(5, E, dtype=torch.bool)  # each token with all experts: uniform too
    assert abs(router_similarity_loss(torch.randn(5, E), everything).item() - 1.0) < 1e-6


def test_router_similarity_rises_for_collapsed_assignments():
    """Fig. 4 of the paper: 2-in-4 where experts (0, 1) and (2, 3) always go together."""
    E = 4
    diverse = pair_mask(E, list(itertools.combinations(range(E), 2)) * 2)  # 12 tokens, all 6 pairs twice
    collapsed = pair_mask(E, [(0, 1), (2, 3)] * 6)  # 12 tokens, the same loads, only 2 pairs
    assert torch.equal(diverse.sum(0), collapsed.sum(0))  # identical load balance
    # the router that produced each mask: high logits on the chosen experts
    loss_diverse = router_similarity_loss(4.0 * diverse.double(), diverse).item()
    loss_collapsed = router_similarity_loss(4.0 * collapsed.double(), collapsed).item()
    assert abs(loss_diverse - 1.0) < 1e-6
    assert loss_collapsed > 1.3
    # load collapse (every token to experts 0 and 1) rises too
    one_pair = pair_mask(E, [(0, 1)] * 12)
    assert router_similarity_loss(4.0 * one_pair.double(), one_pair).item() > loss_collapsed


def test_router_similarity_matches_direct_float64_formula():
    g = torch.Generator().manual_seed(3)
    for N, E in [(12, 5), (20, 8)]:
        logits = torch.randn(N, E, generator=g, dtype=torch.float64) * 2
        mask = torch.rand(N, E, generator=g) < 0.3
        mask[0] = False  # a token without experts
        mask[1] = True  # a token with all of them
        got = router_similarity_loss(logits, mask).item()
        assert got == pytest.approx(rsl_direct(logits, mask), rel=1e-12, abs=1e-14)


def test_router_similarity_guards_the_off_diagonal_when_no_token_has_two_experts():
    E = 4
    mask = pair_mask(E, [(0,), (1,), (2,), (3,)] * 2)
    logits = torch.zeros(8, E, dtype=torch.float64)
    loss = router_similarity_loss(logits, mask)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(1.0 / E)  # only the diagonal half: uniform P gives 1/E


def test_router_similarity_gradients_reach_the_gate_head_only_through_the_logits():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 8, 2, routing="expert_race", gating="identity", target_dim=4).train()
    record = ForwardRecord()
    layer(torch.randn(2, 8, 16), record)
    r = record.moe[0]
    router_similarity_loss(r.logits, r.mask).backward()
    assert layer.router.gate_head.weight.grad.abs().sum() > 0
    assert layer.router.trunk[0].weight.grad.abs().sum() > 0
    assert layer.experts.w1.grad is None and layer.router.target_head.weight.grad is None


# --- balance and z-loss ----------------------------------------------------------------------------------------


def test_balance_loss_is_one_at_uniform_load_and_E_when_collapsed():
    E = 4
    uniform = pair_mask(E, list(itertools.combinations(range(E), 2)))
    logits = torch.randn(6, E, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # uniform f: E * sum_e (1/E) * P_e = sum_e P_e = 1 for any P
    assert balance_loss(logits, uniform).item() == pytest.approx(1.0, abs=1e-12)
    collapsed = pair_mask(E, [(0,)] * 6)
    assert balance_loss(50.0 * collapsed.double(), collapsed).item() == pytest.approx(E, rel=1e-9)
    # direct formula
    mask = torch.rand(10, E, generator=torch.Generator().manual_seed(1)) < 0.5
    z = torch.randn(10, E, dtype=torch.float64)
    f = mask.double().sum(0) / mask.double().sum()
    assert balance_loss(z, mask).item() == pytest.approx(E * float((f * z.softmax(-1).mean(0)).sum()), rel=1e-12)


def test_z_loss_matches_its_definition():
    E = 8
    assert z_loss(torch.zeros(5, E)).item() == pytest.approx(math.log(E) ** 2, rel=1e-6)
    z = torch.randn(7, E, dtype=torch.float64)
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in z.tolist()) / 7
    assert z_loss(z).item() == pytest.approx(want, rel=1e-12)


# --- per-layer regularization ----------------------------------------------------------------------------------


def test_patchify_target_uses_the_dit_token_layout():
    model = tiny_moe(patch_size=2)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(patchify_target(x, 16), model.patchify(x), rtol=0, atol=0)
    x4 = torch.randn(2, 4, 8, 8)
    assert torch.equal(patchify_target(x4, 16), model.patchify(x4))
    assert torch.equal(model.unpatchify(patchify_target(x4, 16)), x4)


def test_per_layer_regularization_is_zero_when_heads_predict_exactly():
    model = tiny_moe().train()
    target_dim = 4  # p*p*C: patch 2 x 2, one channel
    token_value = torch.tensor([0.5, -1.0, 2.0, 0.25])
    with torch.no_grad():  # each head predicts the same per-token vector whatever its input
        for block in model.blocks:
            block.mlp.router.target_head.weight.zero_()
            block.mlp.router.target_head.bias.copy_(token_value)
    # the target whose every token (patch) is `token_value`
    target = model.unpatchify(token_value.expand(3, 16, target_dim))
    record = ForwardRecord()
    model(torch.randn(3, 1, 8, 8), torch.tensor([10.0, 500.0, 990.0]), torch.tensor([1, 2, 3]), record=record)
    terms = auxiliary_losses(record, LossConfig(per_layer_reg=1.0), target)
    assert terms["loss/per_layer_reg"].item() == 0.0
    assert per_layer_regularization([r.target_pred for r in record.moe_layers()], patchify_target(target, 16)).item() == 0.0
    # and it is the mean over layers of the per-element MSE otherwise
    other = torch.randn_like(target)
    want = sum(((token_value - patchify_target(other, 16)) ** 2).mean() for _ in range(2)) / 2
    got = auxiliary_losses(record, LossConfig(per_layer_reg=1.0), other)["loss/per_layer_reg"]
    torch.testing.assert_close(got, want)


def test_per_layer_regularization_gradients_reach_the_router_trunk_and_the_block_input():
    model = tiny_moe().train()
    record = ForwardRecord()
    model(torch.randn(2, 1, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([0, 5]), record=record)
    loss = auxiliary_losses(record, LossConfig(per_layer_reg=1.0), torch.randn(2, 1, 8, 8))["loss/per_layer_reg"]
    loss.backward()
    for block in model.blocks:
        router = block.mlp.router
        assert router.trunk[0].weight.grad.abs().sum() > 0
        assert router.target_head.weight.grad.abs().sum() > 0
        gate_grad = router.gate_head.weight.grad  # the gating head is not part of this loss
        assert gate_grad is None or not gate_grad.any()
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0  # through the trunk into the residual stream


def test_target_heads_do_not_change_the_model_output_or_samples():
    with_heads = tiny_moe(router_target_head=True)
    without = tiny_moe(router_target_head=False)
    state = {k: v for k, v in with_heads.state_dict().items() if "target_head" not in k}
    assert len(state) < len(with_heads.state_dict())
    without.load_state_dict(state, strict=True)
    with torch.no_grad():  # non-zero adaLN gates, so the MoE branch reaches the output
        g = torch.Generator().manual_seed(5)
        for m in (with_heads, without):
            for block in m.blocks:
                w = block.adaLN_modulation[-1].weight
                w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
            m.final_layer.linear.weight.normal_(generator=torch.Generator().manual_seed(8))
    x, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([3.0, 300.0, 600.0, 900.0]), torch.arange(4)
    outs = []
    for m in (with_heads, without):
        m.train()
        record = ForwardRecord()
        train_out = m(x, t, y, record=record)
        update_thresholds(m, [record.kth_scores()])  # the thresholds the eval forward uses
        m.eval()
        with torch.no_grad():
            eval_out = m(x, t, y)
        outs.append((train_out.detach(), eval_out))
    assert outs[0][0].abs().sum() > 0
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    from racedit.sampling import sample_images

    objective = DDPMObjective(1000, learn_sigma=False)
    cfg = SampleConfig(sampler="ddim", steps=3, cfg_scale=2.0)
    a = sample_images(with_heads, objective, IdentityCodec(channels=1), torch.arange(3), cfg, seed=1)
    b = sample_images(without, objective, IdentityCodec(channels=1), torch.arange(3), cfg, seed=1)
    assert torch.equal(a, b)


# --- the training step -----------------------------------------------------------------------------------------


def test_training_losses_add_each_enabled_loss_with_its_coefficient():
    model = tiny_moe().train()
    objective = DDPMObjective(1000, learn_sigma=False)
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(4, 1, 8, 8, generator=g), torch.arange(4)
    draws = MicroBatchDraws(t=torch.tensor([1, 250, 500, 999]), noise=torch.randn(4, 1, 8, 8, generator=g),
                            drop_labels=torch.zeros(4, dtype=torch.bool), null_class=10)
    off = training_losses(model, objective, x0, y, draws, LossConfig(), ForwardRecord())
    assert set(off) == {"loss", "mse"}
    coefs = LossConfig(router_similarity=0.01, per_layer_reg=1.0, balance=0.02, z_loss=1e-3)
    record = ForwardRecord()
    on = training_losses(model, objective, x0, y, draws, coefs, record)
    names = {"router_similarity", "per_layer_reg", "balance", "z_loss"}
    assert {f"loss/{n}" for n in names} | {"loss", "mse", "loss/diffusion"} == set(on)
    torch.testing.assert_close(on["loss/diffusion"], off["loss"])
    want = on["loss/diffusion"] + sum(getattr(coefs, n) * on[f"loss/{n}"] for n in names)
    torch.testing.assert_close(on["loss"], want)
    on["loss"].backward()
    assert model.blocks[0].mlp.router.target_head.weight.grad.abs().sum() > 0
    # only per-layer regularization switched on: the other losses are not even computed
    only = training_losses(model, objective, x0, y, draws, LossConfig(per_layer_reg=0.5), ForwardRecord())
    assert set(only) == {"loss", "mse", "loss/diffusion", "loss/per_layer_reg"}


def test_auxiliary_losses_give_the_same_gradients_under_activation_checkpointing():
    objective = DDPMObjective(1000, learn_sigma=False)
    g = torch.Generator().manual_seed(2)
    x0, y = torch.randn(3, 1, 8, 8, generator=g), torch.arange(3)
    draws = MicroBatchDraws(t=torch.tensor([10, 400, 800]), noise=torch.randn(3, 1, 8, 8, generator=g),
                            drop_labels=torch.zeros(3, dtype=torch.bool), null_class=10)
    coefs = LossConfig(router_similarity=0.1, per_layer_reg=1.0, z_loss=0.01)
    grads = []
    for checkpointing in (False, True):
        model = tiny_moe().train()
        model.grad_checkpointing = checkpointing
        training_losses(model, objective, x0, y, draws, coefs, ForwardRecord())["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_learn_sigma_models_regress_the_epsilon_channels():
    model = tiny_moe(learn_sigma=True).train()
    objective = DDPMObjective(1000, learn_sigma=True)
    draws = MicroBatchDraws(t=torch.tensor([5, 900]), noise=torch.randn(2, 1, 8, 8),
                            drop_labels=torch.zeros(2, dtype=torch.bool), null_class=10)
    record = ForwardRecord()
    terms = training_losses(model, objective, torch.randn(2, 1, 8, 8), torch.arange(2), draws,
                            LossConfig(per_layer_reg=1.0), record)
    assert record.moe[0].target_pred.shape == (2, 16, 4)  # p*p*C with C = 1 data channel, not 2C
    want = per_layer_regularization([r.target_pred for r in record.moe_layers()], patchify_target(draws.noise, 16))
    torch.testing.assert_close(terms["loss/per_layer_reg"], want)


def test_auxiliary_losses_explain_missing_moe_or_heads():
    dense = create_model("DiT-S/2", **TINY_MOE)
    record = ForwardRecord()
    dense(torch.randn(1, 1, 8, 8), torch.tensor([1.0]), torch.tensor([0]), record=record)
    with pytest.raises(ValueError, match="no MoE layer"):
        auxiliary_losses(record, LossConfig(router_similarity=0.01))
    assert auxiliary_losses(record, LossConfig()) == {}
    headless = tiny_moe(router_target_head=False)
    record = ForwardRecord()
    headless(torch.randn(1, 1, 8, 8), torch.tensor([1.0]), torch.tensor([0]), record=record)
    with pytest.raises(ValueError, match="router_target_head"):
        auxiliary_losses(record, LossConfig(per_layer_reg=1.0), torch.randn(1, 1, 8, 8))


# --- race_scope=global: the losses over the batch of all ranks ------------------------------------------------

ROWS = (6, 10)  # unequal on purpose
E_GLOBAL = 4


def global_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(sum(ROWS), E_GLOBAL, generator=g, dtype=torch.float64)
    mask = torch.rand(sum(ROWS), E_GLOBAL, generator=g) < 0.5
    return logits, mask


def global_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logits, mask = global_inputs()
        start = sum(ROWS[:rank])
        local = logits[start:start + ROWS[rank]].clone().requires_grad_(True)
        out = {}
        for name, fn in (("rsl", router_similarity_loss), ("bal", balance_loss)):
            loss = fn(local, mask[start:start + ROWS[rank]], group=dist.group.WORLD)
            (grad,) = torch.autograd.grad(loss, local)
            out[name], out[f"{name}_grad"] = loss.detach(), grad
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_scope_losses_equal_the_concatenated_batch_and_average_to_its_gradient(tmp_path):
    ranks = run_gloo_workers(global_worker, tmp_path)
    logits, mask = global_inputs()
    for name, fn in (("rsl", router_similarity_loss), ("bal", balance_loss)):
        whole = logits.clone().requires_grad_(True)
        loss = fn(whole, mask)
        (grad,) = torch.autograd.grad(loss, whole)
        for r in ranks:
            assert r[name].item() == pytest.approx(loss.item(), rel=1e-12)
        # data-parallel training averages the ranks' gradients: that average is the global loss's gradient
        averaged = torch.cat([r[f"{name}_grad"] for r in ranks]) / 2
        torch.testing.assert_close(averaged, grad, rtol=1e-10, atol=1e-12)
    assert rsl_direct(logits, mask) == pytest.approx(ranks[0]["rsl"].item(), rel=1e-12)
