"""Distributed fitting: two CPU processes (gloo) shard the frozen layers with FSDP2 and produce the
gradients, and after a few steps the transforms, of one process running the same global batch — the
transforms' gradients are all-reduced, not left per rank. A streamed model is sharded as it is read:
no process ever holds a layer whole besides the one being read."""
import gc
import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
from torch.distributed.tensor import DTensor

from orthoquant.config import FitSpec, QuantSpec, Recipe, TransformSpec
from orthoquant.fitting import fit as fit_module, loop, prepare_session
from orthoquant.models.loading import InMemorySource, open_model
from orthoquant.models.generic import spec_for
from orthoquant.models.surgery import layers_of
from orthoquant.models.tiny import tiny_model
from orthoquant.pipeline import make_plan, prepare_model

from helpers import token_windows

CPU = torch.device("cpu")
WINDOWS = token_windows(6, 12, 4)


def fit_recipe(grad_accum: int = 1, steps: int = 1, init: str = "hadamard") -> Recipe:
    fit = FitSpec(batch_size=2, grad_accum=grad_accum, top_k=20, qsur_samples=0, eval_samples=0, steps=steps,
                  schedule="constant", init=init)
    return Recipe(activations=QuantSpec(bits=4, symmetric=False), kv_cache=QuantSpec(bits=4, symmetric=False),
                  transforms=(TransformSpec("down_input"),), fitting=fit)


def session(grad_accum: int, steps: int = 1):
    model = tiny_model("llama", dtype=torch.float64)
    recipe = fit_recipe(grad_accum, steps)
    arch = spec_for(model.config)
    plan = make_plan(model, arch, recipe)
    prepare_model(model, arch, InMemorySource(), CPU, plan)
    return prepare_session(model, arch, recipe, plan, CPU)


def step_gradients(grad_accum: int) -> list[torch.Tensor]:
    """Gradients of step 0 of a fit with batch 2 per micro-batch, on this process."""
    s = session(grad_accum)
    loop.accumulate_gradients(s, WINDOWS, 0)
    return [p.grad.clone() for p in s.learned.parameters()]


def fitted(grad_accum: int) -> list[torch.Tensor]:
    s = session(grad_accum, steps=3)
    loop.train(s, WINDOWS)
    return [p.detach().clone() for p in s.learned.parameters()]


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        s = session(1)
        q = s.layers[0].self_attn.q_proj.weight
        sharded = isinstance(q, DTensor) and q.to_local().shape[0] == q.shape[0] // world
        full = q.full_tensor()
        s.residency.finish()  # gathered back into plain parameters for the layer-wise solve
        q = s.layers[0].self_attn.q_proj.weight
        sharded = sharded and not isinstance(q, DTensor) and torch.equal(q, full)
        sharded = sharded and not any(isinstance(v, DTensor) for v in s.layers[0].state_dict().values())
        grads = step_gradients(grad_accum=1)
        params = fitted(grad_accum=1)
        if rank == 0:
            torch.save({"sharded": sharded, "grads": grads, "params": params}, out)
    finally:
        dist.destroy_process_group()


def test_two_fsdp_processes_fit_as_one_process_on_the_same_global_batch(tmp_path):
    out = tmp_path / "result.pt"
    # fork: the children inherit the imported modules instead of paying for the imports again
    mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2,
                       start_method="fork")
    result = torch.load(out)
    assert result["sharded"]  # each process held half of every frozen weight, whole again after the fit
    single = step_gradients(grad_accum=2)  # 2 micro-batches here = 1 on each of 2 processes
    for a, b in zip(result["grads"], single):  # float32 parameters: summation order shows at 1e-7
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    for a, b in zip(result["params"], fitted(grad_accum=2)):  # three optimiser steps later
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # guard: each rank alone sees half the batch, whose gradient differs
    half = step_gradients(grad_accum=1)
    assert max((a - b).abs().max().item() for a, b in zip(half, single)) > 1e-6


def streamed_session(folder: str, spy: bool = False):
    """A fit session on ``folder``'s model read layer by layer from its safetensors (KLT init, which
    reads every layer's weights); with ``spy``, also what the layers already read held at each read."""
    model, _, arch, source, _ = open_model(folder, "float32", CPU)
    recipe = fit_recipe(init="klt")
    plan = make_plan(model, arch, recipe)
    prepare_model(model, arch, source, CPU, plan)
    held = spy_on_reads(source, layers_of(model, arch)) if spy else []
    return prepare_session(model, arch, recipe, plan, CPU, source), held


def spy_on_reads(source, layers) -> list[dict[str, int]]:
    """``source`` records the layers' :func:`holdings` before each layer it reads (in the returned list)."""
    held, read = [], source.materialize

    def materialize(module, prefix, device):
        held.append(holdings(layers))
        read(module, prefix, device)

    source.materialize = materialize
    return held


def holdings(layers) -> dict[str, int]:
    """Bytes the decoder layers' parameters hold: whole (loaded, unsharded) tensors, the storage behind
    their FSDP shards, and the padded shards FSDP2 keeps of the sharded ones (ceil(rows / 2) rows)."""
    out = dict.fromkeys(("whole", "shard_storage", "padded_shards"), 0)
    for p in (p for layer in layers for p in layer.parameters()):
        if isinstance(p, DTensor):
            out["shard_storage"] += p.to_local().untyped_storage().nbytes()
            out["padded_shards"] += math.ceil(p.shape[0] / 2) * math.prod(p.shape[1:]) * p.element_size()
        elif not p.is_meta:
            out["whole"] += p.numel() * p.element_size()
    return out


def _load_worker(rank: int, world: int, init: str, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        s, held = streamed_session(folder, spy=True)
        after = holdings(s.layers)
        transforms = [p.detach().clone() for p in s.learned.parameters()]
        s.residency.finish(restore=False)  # a streamed model: the solve reads its layers again
        gc.collect()
        fsdp_params = sum(isinstance(o, FSDPParam) for o in gc.get_objects())  # nothing holds the shards
        params = [p for layer in s.layers for p in layer.parameters()]
        unloaded = all(p.is_meta and not isinstance(p, DTensor) for p in params)
        unloaded = unloaded and all(not type(layer).__name__.startswith("FSDP") for layer in s.layers)
        if rank == 0:
            torch.save({"held": held, "after": after, "transforms": transforms, "unloaded": unloaded,
                        "fsdp_params": fsdp_params}, out)
    finally:
        dist.destroy_process_group()


def test_a_streamed_model_is_sharded_as_it_is_read(saved_model, tmp_path):
    folder = saved_model("llama", num_hidden_layers=3)
    out = tmp_path / "result.pt"
    mp.start_processes(_load_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(folder), str(out)), nprocs=2,
                       start_method="fork")
    result = torch.load(out)
    assert len(result["held"]) == 3
    assert all(h["whole"] == 0 for h in result["held"])  # every layer read before was sharded already
    assert result["held"][-1]["shard_storage"] > 0
    after = result["after"]  # each shard owns its own storage: the whole copy it was cut from is freed
    assert after["whole"] == 0 and after["shard_storage"] == after["padded_shards"]
    assert result["unloaded"]  # plain modules on the meta device again, nothing gathered
    assert result["fsdp_params"] == 0  # FSDP's state is gone with its shards while the session lives on
    # the KLT init read every layer through its gathered shards: the same transforms as one process
    single, _ = streamed_session(str(folder))
    assert len(result["transforms"]) == len(list(single.learned.parameters()))
    for a, b in zip(result["transforms"], single.learned.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_a_streamed_fit_releases_its_layers_before_deploy(saved_model, monkeypatch):
    """deploy folds the residual into embedding and lm_head in float64: no layer needs to be loaded then."""
    model, _, arch, source, _ = open_model(str(saved_model("llama")), "float32", CPU)
    recipe = fit_recipe()
    plan = make_plan(model, arch, recipe)
    prepare_model(model, arch, source, CPU, plan)
    loaded_at_deploy, deploy = [], fit_module.deploy

    def spy(model, *args):
        loaded_at_deploy.append(any(not p.is_meta for p in layers_of(model, arch).parameters()))
        deploy(model, *args)

    monkeypatch.setattr(fit_module, "deploy", spy)
    fit_module.fit_transforms(model, arch, recipe, plan, source, WINDOWS, CPU)
    assert loaded_at_deploy == [False]


def _deploy_worker(rank: int, world: int, init: str, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        calls, deploy = [], fit_module.deploy
        fit_module.deploy = lambda *args: (calls.append(rank), deploy(*args))  # a forked child's own module
        model, _, arch, source, _ = open_model(folder, "float32", CPU)
        recipe = fit_recipe()
        plan = make_plan(model, arch, recipe)
        prepare_model(model, arch, source, CPU, plan)
        embedding = model.get_input_embeddings().weight.detach().clone()
        fit_module.fit_transforms(model, arch, recipe, plan, source, WINDOWS, CPU)
        weight = model.get_input_embeddings().weight  # dropped (meta) or as it was on the other processes
        folded = not weight.is_meta and not torch.equal(weight, embedding)
        torch.save({"deploys": len(calls), "embedding_folded": folded}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_only_process_0_deploys_the_fitted_transforms(saved_model, tmp_path):
    """Process 0 alone solves and writes the run: the others neither fold the learned residual into their
    embedding and lm_head nor spend the float64 copies on it."""
    folder, out = saved_model("llama"), tmp_path / "result.pt"
    mp.start_processes(_deploy_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(folder), str(out)),
                       nprocs=2, start_method="fork")
    first, other = (torch.load(f"{out}.{rank}") for rank in (0, 1))
    assert first == {"deploys": 1, "embedding_folded": True}  # the learned residual rotation was fused
    assert other == {"deploys": 0, "embedding_folded": False}


def _ends_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        s = session(1)
        ends = (s.embed, s.head)
        sharded = [isinstance(m.weight, DTensor) for m in ends]
        during = [(s, m.weight.to_local().shape[0] if s else len(m.weight)) for s, m in zip(sharded, ends)]
        whole = [m.weight.full_tensor() if s else m.weight.detach().clone() for s, m in zip(sharded, ends)]
        s.residency.finish()
        after = [(type(m.weight).__name__, m.weight.is_meta, not m.weight.is_meta and torch.equal(m.weight, w))
                 for m, w in zip(ends, whole)]
        torch.save({"during": during, "after": after, "vocab": whole[0].shape[0]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_embedding_and_lm_head_are_sharded_during_the_fit_and_whole_again_on_process_0(tmp_path):
    """Each process keeps 1/2 of the embedding and lm_head rows while the fit runs (FSDP2, gathered for
    each use); afterwards process 0, which deploys and solves, has them whole and the other drops them."""
    out = tmp_path / "result.pt"
    mp.start_processes(_ends_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2,
                       start_method="fork")
    first, other = (torch.load(f"{out}.{rank}") for rank in (0, 1))
    vocab = first["vocab"]
    assert first["during"] == [(True, math.ceil(vocab / 2))] * 2  # FSDP2 gives the first process the odd row
    assert other["during"] == [(True, vocab // 2)] * 2
    assert first["after"] == [("Parameter", False, True)] * 2  # plain, loaded, and equal to the gathered shards
    assert other["after"] == [("Parameter", True, False)] * 2
