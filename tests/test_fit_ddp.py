"""Distributed fitting: two CPU processes (gloo) shard the frozen layers with FSDP2 and produce the
gradients, and after a few steps the transforms, of one process running the same global batch — the
transforms' gradients are all-reduced, not left per rank."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from orthoquant.config import FitSpec, QuantSpec, Recipe, TransformSpec
from orthoquant.fitting import loop, prepare_session
from orthoquant.models.loading import InMemorySource
from orthoquant.models.generic import spec_for
from orthoquant.models.tiny import tiny_model
from orthoquant.pipeline import make_plan, prepare_model

from helpers import token_windows

CPU = torch.device("cpu")
WINDOWS = token_windows(6, 12, 4)


def session(grad_accum: int, steps: int = 1):
    model = tiny_model("llama", dtype=torch.float64)
    fit = FitSpec(batch_size=2, grad_accum=grad_accum, top_k=20, qsur_samples=0, eval_samples=0, steps=steps,
                  schedule="constant")
    recipe = Recipe(activations=QuantSpec(bits=4, symmetric=False), kv_cache=QuantSpec(bits=4, symmetric=False),
                    transforms=(TransformSpec("down_input"),), fitting=fit)
    spec = spec_for(model.config)
    plan = make_plan(model, spec, recipe)
    prepare_model(model, spec, InMemorySource(), CPU, plan)
    return prepare_session(model, spec, recipe, plan, CPU)


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
