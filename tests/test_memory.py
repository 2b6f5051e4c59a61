"""Peak memory stays flat in depth: the streamed pipeline holds one decoder layer at a time, and the
allocator policy that returns freed layers to the system is in force before the model is built.

(scripts/bench_memory.py measures the resulting peak RSS on larger models.)"""
import json

import pytest
import torch
from torch import nn

from orthoquant import device, load_recipe, pipeline, quantize_pretrained
from orthoquant.models.loading import SafetensorsSource, build_skeleton
from orthoquant.models.surgery import layers_of
from orthoquant.models.tiny import tiny_config

CPU = torch.device("cpu")


def materialized_layers(model, arch) -> int:
    return sum(any(not p.is_meta for p in layer.parameters()) for layer in layers_of(model, arch))


@pytest.mark.parametrize("extra", [[], ["refine.iters=3"]], ids=["solve", "refine"])
def test_quantize_pretrained_holds_one_decoder_layer_at_a_time(saved_model, text_file, tmp_path, monkeypatch, extra):
    folder = saved_model("llama", num_hidden_layers=3)
    opened, counts = [], []
    open_model, materialize = pipeline.open_model, SafetensorsSource.materialize

    def recording_open(*args):
        opened.append(open_model(*args))
        return opened[-1]

    def counting_materialize(self, module, prefix, target):
        materialize(self, module, prefix, target)
        model, _, arch = opened[0][:3]
        counts.append(materialized_layers(model, arch))

    monkeypatch.setattr(pipeline, "open_model", recording_open)
    monkeypatch.setattr(SafetensorsSource, "materialize", counting_materialize)
    recipe = load_recipe("gptq-w4a16", ["weights.clip_search=false", f"calibration.source={text_file}",
                                        "calibration.nsamples=2", "calibration.seqlen=16", *extra])
    quantize_pretrained(str(folder), recipe, tmp_path / "run", CPU)
    model, _, arch = opened[0][:3]
    assert counts and max(counts) == 1  # each layer is released before the next is read (also when refined)
    if extra:
        metrics = json.loads((tmp_path / "run" / "run.json").read_text())["metrics"]
        assert all("refine" in metrics[str(i)] for i in range(3))
    assert materialized_layers(model, arch) == 0  # and the last one too


def test_the_mmap_threshold_is_fixed_before_the_skeleton_allocates(monkeypatch):
    """The skeleton's parameters are created on the CPU before they move to meta. Under glibc's
    dynamic threshold they grew the brk heap to the model's size; later layers were carved from it
    and peak RSS grew with depth (a 16-layer model: +130 MB in half the runs)."""
    events = []

    class Libc:
        def mallopt(self, param, value):
            events.append(("mallopt", param, value))
            return 1

    register = nn.Module.register_parameter
    monkeypatch.setattr(device, "_libc", lambda: Libc())
    monkeypatch.setattr(nn.Module, "register_parameter",
                        lambda module, name, param: (events.append("parameter"), register(module, name, param)))
    device.use_mmap_for_large_blocks.cache_clear()  # as in a fresh process
    try:
        build_skeleton(tiny_config("llama"), torch.float32)
    finally:
        device.use_mmap_for_large_blocks.cache_clear()  # the next caller applies it to the real libc
    assert "parameter" in events
    assert events[0] == ("mallopt", device._M_MMAP_THRESHOLD, 1 << 20)


def test_quip_finetuning_holds_one_decoder_layer_at_a_time(saved_model, text_file, tmp_path, monkeypatch):
    """In-layer fine-tuning trains inside the layer being quantized; the end-to-end stage reopens the
    finished layers one at a time from the run folder, for its forward and for its backward pass."""
    from orthoquant import runner

    folder = saved_model("llama", num_hidden_layers=3)
    opened, counts = [], []
    open_model, materialize, load_module = pipeline.open_model, SafetensorsSource.materialize, runner.load_module

    def recording_open(*args):
        opened.append(open_model(*args))
        return opened[-1]

    def count():
        model, _, arch = opened[0][:3]
        counts.append(materialized_layers(model, arch))

    def counting_materialize(self, module, prefix, target):
        materialize(self, module, prefix, target)
        count()

    def counting_load(*args, **kwargs):
        result = load_module(*args, **kwargs)
        count()
        return result

    monkeypatch.setattr(pipeline, "open_model", recording_open)
    monkeypatch.setattr(SafetensorsSource, "materialize", counting_materialize)
    monkeypatch.setattr(runner, "load_module", counting_load)
    recipe = load_recipe("quip-e8p-2bit", [f"calibration.source={text_file}", "calibration.nsamples=4",
                                           "calibration.seqlen=16", "calibration.batch_size=2",
                                           "finetune.layer_epochs=1", "finetune.e2e_epochs=1"])
    run = quantize_pretrained(str(folder), recipe, tmp_path / "run", CPU)
    metrics = run.info()["metrics"]
    assert "finetune" in metrics["0"] and metrics["finetune_e2e"]["epochs"] == 1
    model, _, arch = opened[0][:3]
    assert len(counts) > 2 * 3 and max(counts) == 1  # e2e reopened layers, never two at once
    assert materialized_layers(model, arch) == 0


def test_a_loop_reusing_freed_blocks_faults_its_pages_in_once():
    """Under use_mmap_for_large_blocks every 4 MiB tensor is mapped and faulted in afresh; inside
    reusing_freed_blocks the loop's second and later steps reuse the first one's pages, and after it
    large blocks are mapped again."""
    import resource

    def faults_of_a_loop(steps=20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            torch.ones(1 << 20).add_(1)  # 4 MiB, written
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    device.use_mmap_for_large_blocks.cache_clear()  # applied to the real libc whatever ran before
    device.use_mmap_for_large_blocks()
    mapped = faults_of_a_loop()
    with device.reusing_freed_blocks():
        reused = faults_of_a_loop()
    again = faults_of_a_loop()
    pages = (4 << 20) // resource.getpagesize()
    assert mapped >= 10 * pages and again >= 10 * pages
    assert reused <= 3 * pages


def test_collections_in_the_layer_loop_skip_older_objects_but_free_new_cycles():
    import gc
    import weakref

    class Node:
        pass

    with device.collecting_new_objects_only():
        assert gc.get_freeze_count() > 1000  # the libraries' objects: not scanned by each collection
        node = Node()
        node.itself = node
        ref = weakref.ref(node)
        del node
        gc.collect()
        assert ref() is None  # a cycle made inside is still collected
    assert gc.get_freeze_count() == 0
