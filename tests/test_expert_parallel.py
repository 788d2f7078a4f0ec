"""Gradient accumulation and expert parallelism: a step of micro-batches equals the one-shot step, and spreading the
routed experts over 2 or 4 ranks changes neither the losses nor the parameters, and resumes on another degree."""

import copy
import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from promoe.moe.dispatch import make_backend
from promoe.moe.expert_parallel import ExpertGroup, ExpertParallel
from promoe.moe.experts import ExpertBank
from promoe.moe.plan import token_choice_plan
from promoe.sampling import load_model
from tests.helpers import in_ranks, in_two_ranks, reordered_sums_tolerance, torchrun
from tests.test_train import ROOT, TINY_RUN, losses, reordered_run_tolerance, run

# 8 routed experts, top-2, 1 shared and 1 unconditional; the RCL off (a statistic of each rank's tokens); EMA decay
# 0, so that the exported weights are the parameters after the last step.
SMALL_PROMOE = ["model.overrides.experts=E10A2S1U1", "model.overrides.rcl_weight=0", "train.ema_decay=0",
                "train.grid_steps=0"]


def exported(out) -> dict[str, torch.Tensor]:
    return load_file(out / "ema.safetensors")


def assert_same_parameters(one: dict, other: dict, *run: str, steps: int = 3) -> None:
    """The parameters of two runs of `steps` steps of the tiny run with `run`'s settings, whose sums were taken in
    other orders: apart by at most what AdamW's updates carry of the gradients' rounding (reordered_run_tolerance)."""
    assert one.keys() == other.keys()
    atol = reordered_run_tolerance(steps, *run)[1]
    for name in one:
        torch.testing.assert_close(other[name], one[name], rtol=0, atol=atol, msg=name)


def assert_same_per_step(one: dict, other: dict, *run: str, key_steps=(1, 2, 3), banks_regrouped=False) -> None:
    """A loss or gradient norm of each step, within its step's reordered_run_tolerance."""
    assert sorted(other) == list(key_steps)
    for step in key_steps:
        rel = reordered_run_tolerance(step, *run, banks_regrouped=banks_regrouped)[0]
        assert other[step] == pytest.approx(one[step], rel=rel), step


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_step_of_four_micro_batches_equals_the_step_without(tmp_path, ranks):
    launcher = torchrun(ranks) if ranks > 1 else (sys.executable,)
    run(tmp_path / "whole", "--max-steps", "1", *SMALL_PROMOE, launcher=launcher)
    per_rank = 16 // ranks
    run(tmp_path / "micro", "--max-steps", "1", *SMALL_PROMOE, f"train.micro_batch={per_rank // 4}",
        launcher=launcher)
    # The micro-batches sum the loss's mean and the weight gradients in 4 parts: the same sums in another order.
    assert_same_per_step(losses(tmp_path / "whole"), losses(tmp_path / "micro"), *SMALL_PROMOE, key_steps=(1,))
    # Adam's first step hardly sees the scale of the gradient: the norm does.
    assert_same_per_step(column(tmp_path / "whole", "grad_norm"), column(tmp_path / "micro", "grad_norm"),
                         *SMALL_PROMOE, key_steps=(1,))
    assert_same_parameters(exported(tmp_path / "whole"), exported(tmp_path / "micro"), *SMALL_PROMOE, steps=1)


def training_driver():
    """train/run.py as a module (a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_run", ROOT / "train" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_with_the_rcl_and_load_balance_on_a_step_is_the_mean_of_its_micro_batches_forward_alone():
    """The stated semantics (train/run.py, accumulate_gradients): each micro-batch's RCL and load-balance loss are
    those of a forward of that micro-batch alone, and the step's gradient is the mean of the micro-batches'."""
    from promoe.diffusion import make_objective
    from tests.helpers import tiny_model

    model = tiny_model("ProMoE-S", experts="E6A2S1U1", lb_weight=0.01).train()
    assert model.config.rcl_weight > 0
    objective, micro, parts = make_objective("rf"), 4, 4
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(micro * parts, 4, 8, 8, generator=generator), torch.arange(micro * parts) % 11
    timesteps, noise = objective.draw(images.shape, generator)

    alone = copy.deepcopy(model)
    losses, terms, grads = [], [], []
    for part in (slice(start, start + micro) for start in range(0, micro * parts, micro)):
        alone.zero_grad(set_to_none=True)
        loss, part_terms = objective.loss(alone, images[part], labels[part], draws=(timesteps[part], noise[part]),
                                          drop_labels=False)
        loss.backward()
        losses.append(loss.detach())
        terms.append(part_terms)
        grads.append({name: param.grad.clone() for name, param in alone.named_parameters()})
    assert {"rcl", "load_balance"} <= terms[0].keys()

    loss, step_terms, _ = training_driver().accumulate_gradients(
        model, objective, (images, labels, timesteps, noise), micro, torch.device("cpu"))
    # The same forwards, one by one: the losses are bit-identical; their mean is taken over the same 4 values.
    assert loss == torch.stack(losses).mean()
    for name in ("rcl", "load_balance", "mse"):
        assert step_terms[name] == torch.stack([part[name].detach() for part in terms]).mean(), name
    for name, param in model.named_parameters():
        # (loss_i / 4)'s gradient is g_i / 4 exactly (a power of two); the 4 of them added in another grouping.
        expected = torch.stack([part[name] for part in grads]).mean(0)
        torch.testing.assert_close(param.grad, expected, **reordered_sums_tolerance(
            parts, magnitude=expected.abs().max().item()), msg=name)
    # What the stated semantics change: one forward of the whole batch takes its RCL over all 16 samples' tokens.
    _, whole_terms = objective.loss(copy.deepcopy(alone), images, labels, draws=(timesteps, noise), drop_labels=False)
    assert not torch.allclose(whole_terms["rcl"], step_terms["rcl"], rtol=1e-3)


def test_micro_batch_must_divide_the_per_rank_batch(tmp_path):
    command = [sys.executable, str(ROOT / "train" / "run.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               "--out", str(tmp_path), *TINY_RUN, "train.micro_batch=5", "--max-steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "train.micro_batch (5) must divide the per-rank batch 16" in result.stderr


# 2 ranks share 7 routed experts unevenly (4 + 3); 4 ranks share 8 in 2 groups of 2 ranks, then 1 group of 4.
# The 4-rank case (ep < world: replicas that sum their bank gradients) is slow (90 s); the default run keeps the
# checkpoint test's 4-rank ep=2 run against the run without expert parallelism.
@pytest.mark.parametrize("ranks, degrees, experts", [
    (2, (2,), "E9A2S1U1"), pytest.param(4, (2, 4), "E10A2S1U1", marks=pytest.mark.slow)],
    ids=["2-ranks-uneven", "4-ranks"])
def test_expert_parallel_runs_give_the_same_losses_and_parameters(tmp_path, ranks, degrees, experts):
    model = [*SMALL_PROMOE, f"model.overrides.experts={experts}"]
    run(tmp_path / "one", "--max-steps", "3", *model)
    run(tmp_path / "plain", "--max-steps", "3", *model, launcher=torchrun(ranks))
    plain = losses(tmp_path / "plain")
    for degree in degrees:
        out = tmp_path / f"ep{degree}"
        result = run(out, "--max-steps", "3", *model, f"train.expert_parallel={degree}", launcher=torchrun(ranks))
        assert f"expert parallel {degree}" in result.stdout
        assert_same_per_step(plain, losses(out), *model)
        assert_same_per_step(column(tmp_path / "plain", "grad_norm"), column(out, "grad_norm"), *model,
                             banks_regrouped=True)
        assert_same_parameters(exported(tmp_path / "plain"), exported(out), *model)
    assert_same_per_step(column(tmp_path / "one", "mse"), column(tmp_path / f"ep{degrees[-1]}", "mse"), *model)


def column(out, name: str) -> dict[int, float]:
    with open(out / "metrics.csv") as file:
        return {int(row["step"]): float(row[name]) for row in csv.DictReader(file)}


# Resuming on ep=1 (the layout's independence of the degree) runs by default; on ep=4 it is slow (+50 s).
@pytest.mark.parametrize("degree", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_an_expert_parallel_checkpoint_resumes_on_another_degree(tmp_path, degree):
    run(tmp_path / "whole", "--max-steps", "3", *SMALL_PROMOE, launcher=torchrun(4))
    out = tmp_path / f"then_ep{degree}"
    run(out, "--max-steps", "2", *SMALL_PROMOE, "train.expert_parallel=2", launcher=torchrun(4))
    # The sampler reads the expert-parallel checkpoint's banks whole: the EMA weights the run exported.
    sampled = load_model(out / "checkpoints" / "step_0000002", weights="ema")[0].state_dict()
    assert all(torch.equal(sampled[name], value) for name, value in exported(out).items())
    result = run(out, "--max-steps", "3", *SMALL_PROMOE, f"train.expert_parallel={degree}",
                 launcher=torchrun(4))
    assert "resumed from" in result.stdout
    assert_same_per_step(losses(tmp_path / "whole"), losses(out), *SMALL_PROMOE)
    assert_same_parameters(exported(tmp_path / "whole"), exported(out), *SMALL_PROMOE)


def test_expert_choice_models_are_refused_with_a_reason(tmp_path):
    command = [*torchrun(2), str(ROOT / "train" / "run.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               "--out", str(tmp_path), *TINY_RUN, "model.name=EC-DiT-S", "model.overrides.experts=E8A2S0U0",
               "train.expert_parallel=2", "--max-steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "routes by expert choice" in result.stderr


# The layer's dispatch on its own, in 2 processes, 5 routed experts dealt 3 + 2, against the backend's dispatch of
# the whole bank: outputs, x's gradient and the bank's gradients (a routed expert's summed over the ranks whose
# tokens it ran). Cases: tokens to any expert with some unconditional ones (their spare slot dropped); every token
# to rank 0's experts (rank 1 receives none); the same with no unconditional token on rank 1 (it runs nothing).
CASES = {"any-expert": (5, True), "rank-1-receives-none": (3, True), "rank-1-runs-nothing": (3, False)}


def _dispatch_in_two_ranks(rank: int, port: int, backend_name: str, case: str, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        chosen, uncond_on_rank_1 = CASES[case]
        torch.manual_seed(0)  # both ranks build the same whole bank and inputs, then each takes its share
        routed, uncond, dim, tokens = 5, 1, 8, 10
        bank = ExpertBank(routed + uncond, dim, 16)
        with torch.no_grad():
            for param in bank.parameters():
                param.normal_()
        x_ND = torch.randn(2, tokens, dim)[rank].requires_grad_()
        ids_NK = torch.randint(0, chosen, (tokens, 2))
        if rank == 0 or uncond_on_rank_1:
            ids_NK[:3, 0], ids_NK[:3, 1] = routed, routed + uncond  # unconditional: the spare slot dropped
        gates_NK = torch.rand(tokens, 2)
        base_ND = torch.randn(tokens, dim)
        backend = make_backend(backend_name)
        plan = token_choice_plan(ids_NK, gates_NK, routed + uncond, has_dropped_slots=True)
        expected = backend.dispatch(x_ND, plan, bank, base_ND)
        expected.square().sum().backward()

        group = ExpertGroup(dist.group.WORLD, None, 2, rank, routed, uncond)
        assert group.shares == [3, 2]
        local = ExpertBank(group.shares[rank] + uncond, dim, 16)
        with torch.no_grad():
            for name, param in local.named_parameters():
                param.copy_(getattr(bank, name)[group.bank_rows()])
        x_again_ND = x_ND.detach().clone().requires_grad_()
        got = ExpertParallel(group)(backend, x_again_ND, plan, local, base_ND)
        got.square().sum().backward()
        # The two sides run their GEMMs over differently grouped rows, so each sum is taken in another order: the
        # forward's (dim, then hidden) and the backward's (dim, hidden, then the top-2 slots) reductions chained.
        forward_sums, backward_sums = (dim, 16), (dim, 16, 2)
        torch.testing.assert_close(got, expected, **reordered_sums_tolerance(
            *forward_sums, magnitude=expected.abs().max().item()))
        torch.testing.assert_close(x_again_ND.grad, x_ND.grad, **reordered_sums_tolerance(
            *forward_sums, *backward_sums, magnitude=x_ND.grad.abs().max().item()))
        for name, param in local.named_parameters():
            whole_grad = getattr(bank, name).grad
            summed = whole_grad.clone()
            dist.all_reduce(summed)
            rows = group.bank_rows()
            # Summed in another order (one GEMM over both ranks' rows, against a sum of two): the chained sums
            # above, then the bank gradient's own over both ranks' tokens.
            expected_grad = summed[rows[:group.local_routed]]
            torch.testing.assert_close(param.grad[:group.local_routed], expected_grad, **reordered_sums_tolerance(
                *forward_sums, *backward_sums, 2 * tokens, magnitude=expected_grad.abs().max().item()))
            torch.testing.assert_close(param.grad[group.local_routed:], whole_grad[routed:])
        results[rank] = True
    finally:
        dist.destroy_process_group()


@pytest.mark.order_sensitive
@pytest.mark.parametrize("backend_name", ["torch", "loop", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_expert_parallel_dispatch_equals_the_whole_banks(backend_name, case):
    assert in_two_ranks(_dispatch_in_two_ranks, backend_name, case) == {0: True, 1: True}


def _fused_step_in_two_ranks(rank: int, port: int, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from promoe.train_config import OptimSection
    from promoe.training.optimizer import make_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # FSDP2's DTensors over both ranks, DTensors over another mesh (as expert banks over their replicas, here
        # of one rank each) and a plain layer.
        replicas = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replica", "expert"))["replica"]

        def three_kinds() -> torch.nn.Module:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 4), torch.nn.GELU(),
                                        torch.nn.Linear(4, 3))
            fully_shard(model[0])
            fully_shard(model[2], mesh=replicas)
            return model

        optim = OptimSection(lr=1e-2, weight_decay=0.1)
        fused, reference = three_kinds(), three_kinds()
        optimizer = make_optimizer(fused, optim)
        kinds = [{param.device_mesh.size() if isinstance(param, DTensor) else None for param in group["params"]}
                 for group in optimizer.param_groups]
        assert kinds == [{2}, {1}, {None}] and all(group["fused"] for group in optimizer.param_groups)
        # The definition: AdamW one tensor at a time.
        slow = torch.optim.AdamW(reference.parameters(), lr=optim.lr, betas=optim.betas,
                                 weight_decay=optim.weight_decay, foreach=False, fused=False)
        torch.manual_seed(1 + rank)
        for x in torch.randn(3, 5, 6):
            for model, opt in ((fused, optimizer), (reference, slow)):
                model(x).square().sum().backward()
                opt.step()
                opt.zero_grad()
        for (name, got), (_, expected) in zip(fused.named_parameters(), reference.named_parameters()):
            got, expected = (value.to_local() if isinstance(value, DTensor) else value for value in (got, expected))
            # Elementwise maths, each value rounded a few times per step, in another order: 3 steps x a few eps
            # of the parameter.
            torch.testing.assert_close(got, expected, rtol=3 * 8 * torch.finfo(torch.float32).eps,
                                       atol=3 * 8 * torch.finfo(torch.float32).eps * expected.abs().max().item(),
                                       msg=name)
        results[rank] = True
    finally:
        dist.destroy_process_group()


def test_the_optimizer_fuses_the_tensors_of_each_mesh_and_plain_ones_in_groups_of_their_own():
    """Expert parallelism's banks (DTensors over their replicas) beside FSDP2's DTensors over all ranks and plain
    tensors: one fused group per mesh or kind, which updates as the per-tensor AdamW does."""
    assert in_two_ranks(_fused_step_in_two_ranks) == {0: True, 1: True}


def _bank_sums_in_ranks(rank: int, port: int, ranks: int, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import promoe
    from promoe.training.expert_parallel import (
        bank_gradient_sums,
        shard_banks,
        sum_bank_gradients_in_backward,
        sync_expert_gradients,
    )
    from promoe.zoo import build_mlp
    from tests.helpers import TINY, randomize_

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    try:
        config = promoe.model_config("ProMoE-S", **TINY, experts="E6A2S1U1")
        mesh = init_device_mesh("cpu", (ranks // 2, 2), mesh_dim_names=("replica", "expert"))
        index = mesh.get_local_rank("expert")

        def two_layers(sharded: bool) -> torch.nn.ModuleList:
            model = torch.nn.ModuleList([build_mlp(config, block_index=1), build_mlp(config, block_index=1)]).train()
            randomize_(model)  # alike on both ranks
            for layer in model:  # each rank keeps its 2 of the 4 routed experts, and the unconditional one
                routed = layer.router.num_routed
                layer.spread_experts(ExpertGroup(mesh.get_group("expert"), mesh["replica"], 2, index, routed,
                                                 layer.experts.num_experts - routed))
                for name, param in list(layer.experts.named_parameters()):
                    setattr(layer.experts, name, torch.nn.Parameter(param.detach()[layer.expert_group.bank_rows()]))
                if sharded:  # FSDP2 over the replicas, as `parallelise` shards them
                    shard_banks(layer, MixedPrecisionPolicy(), reshard=True)
            return model

        # The banks as the run shards them, and the same banks as plain tensors whose gradients stay on this rank.
        model, local = two_layers(sharded=True), two_layers(sharded=False)
        sums = bank_gradient_sums(model)
        started_when_the_backward_reached_layer_0 = []
        model[0].register_full_backward_pre_hook(
            lambda *_: started_when_the_backward_reached_layer_0.append(sums.started))
        torch.manual_seed(1 + rank)
        labels = torch.tensor([1, 10, 3, 4])  # 10: the null label, whose tokens run the unconditional expert
        for last in (False, True):  # two micro-batches
            x = torch.randn(4, 16, TINY["hidden_size"])
            for layer in model:
                layer.experts.set_requires_gradient_sync(last)
            sum_bank_gradients_in_backward(model, last)
            for layers in (model, local):
                layers[1](layers[0](x, labels)[0], labels)[0].square().sum().backward()
        assert started_when_the_backward_reached_layer_0 == [0, 1]  # the last layer's sum under way, not before
        sync_expert_gradients(model)
        assert sums.started == 0 and not sums.armed
        replicas = mesh.get_local_rank("replica")
        for (name, param), expected in zip(model.named_parameters(), local.parameters()):
            if ".experts." not in name:
                continue
            routed = model[0].expert_group.local_routed
            expected = expected.grad.clone()
            assert expected.isfinite().all() and expected.abs().max() > 0, name
            # The routed rows over their replicas, the unconditional ones over all ranks; this rank's columns.
            dist.all_reduce(expected[:routed], group=mesh.get_group("replica"))
            dist.all_reduce(expected[routed:])
            expected = (expected / ranks).chunk(ranks // 2, dim=1)[replicas]
            # Sums of 2 terms (and their division by 2) are exact whatever the order; of 4, within their reordering.
            tolerance = reordered_sums_tolerance(ranks, magnitude=expected.abs().max().item()) if ranks > 2 else {
                "rtol": 0, "atol": 0}
            torch.testing.assert_close(param.grad.to_local(), expected, **tolerance,
                                       msg=lambda text, name=name: f"{name}: {text}")
        results[rank] = True
    finally:
        dist.destroy_process_group()


# On 4 ranks (replicas of 2 that reduce-scatter the bank's columns): slow, as every test that spawns 4 ranks.
@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_bank_gradient_sums_start_in_the_last_backward_per_layer_and_average_over_ranks(ranks):
    """Two MoE layers at ep = 2 on 2 or 4 ranks, their banks sharded by FSDP2 over their replicas (1 or 2 ranks),
    two micro-batches: the later layer's bucket is started before the backward reaches the earlier layer, only in
    the last micro-batch's backward, and after `finish` each rank's shard of each bank gradient is the ranks'
    average (the routed rows summed over their replicas, the unconditional ones over all ranks, divided by the
    world size)."""
    assert in_ranks(ranks, _bank_sums_in_ranks, ranks) == dict.fromkeys(range(ranks), True)


def _bank_rows_in_two_ranks(rank: int, port: int, folder: str, results: dict) -> None:
    import torch.distributed.checkpoint as dcp

    from promoe.training.expert_parallel import BankRows
    from promoe.weights import load_dcp, read_dcp_metadata

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same whole bank on both ranks: 7 routed experts dealt 4 + 3, 1 unconditional
        whole = torch.randn(8, 3, 2)
        group = ExpertGroup(dist.group.WORLD, None, 2, rank, 7, 1)
        local = whole[group.bank_rows()]
        dcp.save({"bank": BankRows(local, group)}, checkpoint_id=folder)
        stored = read_dcp_metadata(folder).state_dict_metadata["bank"]
        # On disk: the whole bank's shape, each rank's routed rows at their offset, the unconditional row once.
        assert stored.size == whole.shape
        assert sorted((chunk.offsets[0], chunk.sizes[0]) for chunk in stored.chunks) == [(0, 4), (4, 3), (7, 1)]
        with pytest.raises(RuntimeError, match="runs no op"):
            BankRows(local, group) + 1
        # Read whole (as without expert parallelism, the sampler or the EMA export do) ...
        read_whole = torch.zeros_like(whole)
        load_dcp({"bank": read_whole}, folder)
        # ... and into the other rank's rows, in place (as another degree would cut them), by offset alone.
        other = ExpertGroup(dist.group.WORLD, None, 2, 1 - rank, 7, 1)
        read_other = torch.zeros((len(other.bank_rows()), 3, 2))
        load_dcp({"bank": BankRows(read_other, other)}, folder)
        results[rank] = (torch.equal(read_whole, whole), torch.equal(read_other, whole[other.bank_rows()]))
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_of_bank_rows_holds_whole_banks_and_loads_into_any_rows(tmp_path):
    """Each rank writes its own rows of a bank (no rank gathers it), the file holds the whole bank, and it reads back
    whole or into another rank's rows, bit for bit."""
    assert in_two_ranks(_bank_rows_in_two_ranks, str(tmp_path / "checkpoint")) == {0: (True, True), 1: (True, True)}


def _sharded_bank_rows_in_two_ranks(rank: int, port: int, folder: str, results: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from promoe.training.expert_parallel import BankRows, whole_bank_on_rank_0
    from promoe.weights import load_dcp, read_dcp_metadata

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same whole bank on both ranks: 7 routed experts, 1 unconditional
        whole = torch.randn(8, 4, 2)
        # One expert group of one rank each (ep = 1), whose bank FSDP2 shards on dim 1 over the 2 replicas.
        replicas = init_device_mesh("cpu", (2,))
        alone = dist.new_subgroups_by_enumeration([[0], [1]])[0]
        group = ExpertGroup(alone, replicas, 1, 0, 7, 1)
        sharded = distribute_tensor(whole, replicas, [Shard(1)])
        dcp.save({"bank": BankRows(sharded, group)}, checkpoint_id=folder)
        stored = read_dcp_metadata(folder).state_dict_metadata["bank"]
        # On disk: the whole bank, each rank's columns of its routed rows and of the unconditional row.
        assert stored.size == whole.shape
        assert sorted((*chunk.offsets[:2], *chunk.sizes[:2]) for chunk in stored.chunks) == [
            (0, 0, 7, 2), (0, 2, 7, 2), (7, 0, 1, 2), (7, 2, 1, 2)]
        read_whole = torch.zeros_like(whole)
        load_dcp({"bank": read_whole}, folder)
        # Into the rows of ep = 2 on the same 2 ranks (other blocks than were written), and back into the shard.
        other = ExpertGroup(dist.group.WORLD, None, 2, rank, 7, 1)
        read_rows = torch.zeros((len(other.bank_rows()), 4, 2))
        load_dcp({"bank": BankRows(read_rows, other)}, folder)
        read_shard = distribute_tensor(torch.zeros_like(whole), replicas, [Shard(1)])
        load_dcp({"bank": BankRows(read_shard, group)}, folder)
        # The EMA export's gather: the bank whole on rank 0 only.
        gathered = whole_bank_on_rank_0(sharded, group)
        exported = torch.equal(gathered, whole) if rank == 0 else gathered is None
        results[rank] = (torch.equal(read_whole, whole), torch.equal(read_rows, whole[other.bank_rows()]),
                         torch.equal(read_shard.to_local(), sharded.to_local()), exported)
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_of_sharded_bank_rows_holds_whole_banks_and_loads_into_any_layout(tmp_path):
    """A bank that FSDP2 shards on dim 1 over its replicas: each rank writes its columns of its rows, the file holds
    the whole bank, which reads back whole, into expert-parallel rows and into the shard, bit for bit; the EMA
    export's gather puts it whole on rank 0 alone."""
    assert in_two_ranks(_sharded_bank_rows_in_two_ranks, str(tmp_path / "checkpoint")) == dict.fromkeys(
        (0, 1), (True, True, True, True))


def _bank_state_in_ranks(rank: int, port: int, ranks: int, degree: int, results: dict) -> None:
    from promoe.diffusion import make_objective
    from promoe.moe.layer import moe_layers, place_dispatch
    from promoe.train_config import load_config
    from promoe.training.ema import EMA
    from promoe.training.expert_parallel import (
        clip_gradients,
        expert_banks,
        sum_bank_gradients_in_backward,
        sync_expert_gradients,
    )
    from promoe.training.optimizer import make_optimizer
    from promoe.training.parallel import build_on_meta, parallelise
    from promoe.training.ranks import local_part
    from tests.test_train import TINY_RUN

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    try:
        config = load_config(ROOT / "configs" / "demo.yaml", [*TINY_RUN, *SMALL_PROMOE,
                                                               f"train.expert_parallel={degree}"])
        device = torch.device("cpu")
        model = build_on_meta(config)
        parallelise(model, config, device)
        place_dispatch(model, device)
        optimizer, ema = make_optimizer(model, config.optim), EMA(model, config.train.ema_decay)
        torch.manual_seed(rank)
        images = torch.randn(4, model.config.in_channels, model.config.input_size, model.config.input_size)
        sum_bank_gradients_in_backward(model, last=True)
        make_objective(config.train.objective).loss(model, images, torch.randint(0, 10, (4,)),
                                                    drop_labels=False)[0].backward()
        sync_expert_gradients(model)
        clip_gradients(model, config.optim.grad_clip)
        optimizer.step()
        ema.update(model, 0)
        held = whole = 0
        for name, (param, group) in expert_banks(model).items():
            state = [param, param.grad, ema.params[name], optimizer.state[param]["exp_avg"],
                     optimizer.state[param]["exp_avg_sq"]]
            held += sum(local_part(tensor).numel() * tensor.element_size() for tensor in state)
            whole += len(state) * group.bank_size * param[0].numel() * param.element_size()
        group = moe_layers(model)[0].expert_group
        results[rank] = (held, whole, group.local_routed, group.num_uncond, group.bank_size)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_at_ep_2_on_4_ranks_a_rank_holds_about_a_quarter_of_the_bank_state():
    """Weights, gradients, both AdamW moments and the EMA of the banks, counted in bytes on each rank after a step
    at ep = 2 on 4 ranks: each rank's rows (E / 2 routed + U unconditional) sharded over its 2 replicas, so its
    share of the whole is (E / 2 + U) / (2 (E + U)) exactly: about 1 / 4 (the U unconditional rows repeat along
    `expert`), where the banks cut by expert alone held twice that."""
    results = in_ranks(4, _bank_state_in_ranks, 4, 2)
    for held, whole, routed, uncond, bank_size in results.values():
        assert held * 2 * bank_size == whole * (routed + uncond)
        assert held < 1.25 * whole / 4
