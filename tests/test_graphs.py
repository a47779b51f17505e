"""GraphedStep: a decode step replayed as a CUDA graph equals append + attend, across online
updates and cache growth (eager on the CPU, so the CPU tests check the fallback)."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import pytest
import torch

from multipole import MultipoleConfig, MultipoleState
from multipole.baselines import METHODS
from multipole.graphs import GraphedStep
from multipole.ops.kernel_utils import interpreting, triton_installed

SMALL = MultipoleConfig(sink_tokens=4, interval=8, block_size=64, token_budget=24)


def _step_inputs(gen, b, h, group, d, dtype, *, cluster=False, lookup=False):
    """One step's new keys, values, clustering keys ``[B, H, 1, D]`` and queries ``[B, Hq, D]``
    (None where not asked)."""
    k, v = (torch.randn(b, h, 1, d, generator=gen).to(dtype) for _ in range(2))
    ck = torch.randn(b, h, 1, d, generator=gen).to(dtype) if cluster else None
    q = torch.randn(b, h * group, d, generator=gen).to(dtype)
    lq = torch.randn(b, h * group, d, generator=gen).to(dtype) if lookup else None
    return k, v, ck, q, lq


def _cuda_inputs(gen, b, h, group, d, dtype, **kwargs):
    return [
        None if t is None else t.cuda() for t in _step_inputs(gen, b, h, group, d, dtype, **kwargs)
    ]


def _prefill_pair(gen, cfg, lengths, capacity, h, d, dtype, device, cluster=False, method=None):
    """Two identical states (the graphed one and its eager twin)."""
    b = len(lengths)
    k, v = (torch.randn(b, h, capacity, d, generator=gen).to(dtype) for _ in range(2))
    ck = torch.randn(b, h, capacity, d, generator=gen).to(dtype) if cluster else None
    cls = MultipoleState if method is None else METHODS[method]
    move = (lambda t: None) if ck is None else (lambda t: t.to(device))
    return [
        cls.prefill(k.to(device), v.to(device), cfg, cluster_keys=move(ck), lengths=lengths)
        for _ in range(2)
    ]


def _check_same(state, twin, out, ref, exact=True):
    if exact:
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert state.seq_lens == twin.seq_lens
    assert state.clustered_len == twin.clustered_len
    assert state.stats() == twin.stats()


# ---------------------------------------------------------------------- CPU (eager fallback)
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "lookup+cluster+scale"])
def test_cpu_steps_run_eagerly_and_equal_append_attend(gen, backend, extras):
    cfg = dataclasses.replace(SMALL, backend=backend)
    steps = 3 * cfg.interval + 3
    h, group, d, dtype = 2, 2, 16, torch.float32
    state, twin = _prefill_pair(gen, cfg, [70, 57], 70, h, d, dtype, "cpu", cluster=extras)
    step = GraphedStep(state)
    scale = 0.3 if extras else None
    before = list(twin.clustered_len)
    for _ in range(steps):
        k, v, ck, q, lq = _step_inputs(gen, 2, h, group, d, dtype, cluster=extras, lookup=extras)
        out = step(k, v, q, lookup_q=lq, scale=scale, cluster_keys=ck)
        twin.append(k, v, cluster_keys=ck)
        _check_same(state, twin, out, twin.attend(q, lookup_q=lq, scale=scale))
    assert all(a >= b0 + 2 * cfg.interval for a, b0 in zip(twin.clustered_len, before, strict=True))
    assert (step.eager_steps, step.captures, step.replays) == (steps, 0, 0)


@pytest.mark.skipif(
    not (interpreting() and triton_installed()), reason="needs TRITON_INTERPRET=1 and Triton"
)
def test_cpu_triton_interpreter_steps_equal_append_attend(gen):
    """backend="triton" on the CPU (interpreter): eager too; tiny, the interpreter is slow."""
    cfg = dataclasses.replace(SMALL, backend="triton", kmeans_iters=2, update_iters=1)
    state, twin = _prefill_pair(gen, cfg, [40, 33], 40, 1, 16, torch.float32, "cpu")
    step = GraphedStep(state)
    before = list(twin.clustered_len)
    for _ in range(5):  # both sequences update within 3 steps
        k, v, _, q, _ = _step_inputs(gen, 2, 1, 2, 16, torch.float32)
        out = step(k, v, q)
        twin.append(k, v)
        _check_same(state, twin, out, twin.attend(q))
    assert all(a > b0 for a, b0 in zip(twin.clustered_len, before, strict=True))
    assert step.eager_steps == 5


@pytest.mark.parametrize("method", [m for m in METHODS if m != "multipole"])
def test_other_methods_step_eagerly(gen, method):
    h, d = 2, 16
    state, twin = _prefill_pair(gen, SMALL, [60, 45], 60, h, d, torch.float32, "cpu", method=method)
    step = GraphedStep(state)
    for _ in range(2 * SMALL.interval):
        k, v, _, q, _ = _step_inputs(gen, 2, h, 4, d, torch.float32)
        out = step(k, v, q)
        twin.append(k, v)
        _check_same(state, twin, out, twin.attend(q))
    assert step.replays == 0


def test_invalid_inputs_raise_the_states_errors(gen):
    state, _ = _prefill_pair(gen, SMALL, [40], 40, 2, 16, torch.float32, "cpu")
    step = GraphedStep(state)
    k, v, _, q, _ = _step_inputs(gen, 1, 2, 2, 16, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        step(k.double(), v, q)
    with pytest.raises(ValueError, match="scale"):
        step(k, v, q, scale=-1.0)


def test_appends_before_update_counts_down_to_each_update(gen):
    state, _ = _prefill_pair(gen, SMALL, [70, 57, 21], 70, 2, 16, torch.float32, "cpu")
    updates = 0
    for _ in range(4 * SMALL.interval):
        left = state.appends_before_update()
        assert left >= 0
        before = list(state.clustered_len)
        k, v, _, _, _ = _step_inputs(gen, 3, 2, 1, 16, torch.float32)
        state.append(k, v)
        updated = state.clustered_len != before
        updates += updated
        assert updated == (left == 0)
        if not updated:
            assert state.appends_before_update() == left - 1
    assert updates >= 4


# ---------------------------------------------------------------------- CPU, emulated graphs
class _EmulatedGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on the CPU, to check GraphedStep's bookkeeping
    where CI runs: a capture keeps the step's host effects and undoes its device effects (the
    cache write and the device lengths), as a real capture runs nothing on the device; a
    replay redoes the device effects only, through the state's own code, into the captured
    output and read counts."""

    def __init__(self, step: GraphedStep, scale: float | None) -> None:
        self.step, self.scale = step, scale

    def capture_begin(self, pool=None, capture_error_mode="global"):
        s = self.step.state
        stores = (s._keys, s._values, s._cluster_keys, s._seq_lens_device)
        self.saved = [(t, t.clone()) for t in stores if t is not None]
        self.baked = self._baked()

    def _baked(self):
        """What a real capture bakes in: a replay must find the same."""
        s = self.step.state
        objects = (s._keys, s._values, s._cluster_keys, s._seq_lens_device, s._fused)
        return [id(t) for t in (*objects, *self.step._static)], s.config

    def capture_end(self):
        for t, saved in self.saved:
            t.copy_(saved)

    def replay(self):
        assert self._baked() == self.baked, "replayed a stale graph"
        step, s = self.step, self.step.state
        # a graph holds no online update: those due ran before the replay
        assert s.appends_before_update() > 0, "replayed into an online update"
        k, v, q, lq, ck = step._static
        host = s.seq_lens, s._reads
        s.append(k, v, cluster_keys=ck)
        step._out.copy_(s.attend(q, lookup_q=lq, scale=self.scale))
        for name in ("tokens_exact", "clusters_selected", "centroids_scored", "metadata_bytes"):
            getattr(step._reads, name).copy_(getattr(s._reads, name))
        s.seq_lens, s._reads = host


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "lookup+cluster+scale"])
def test_emulated_replays_keep_the_state_right(gen, monkeypatch, extras):
    """GraphedStep with an emulated graph on the CPU: outputs, lengths (host and device) and
    stats equal an eager twin's over steps with online updates (run before a replay), a cache
    growth, a 3-token append made on the state directly and a config change; every step
    replays but those around the growth and the config change."""
    h, group, d, dtype = 2, 2, 16, torch.float32
    state, twin = _prefill_pair(gen, SMALL, [70, 62], 80, h, d, dtype, "cpu", cluster=extras)
    scale = 0.3 if extras else None
    step = GraphedStep(state)
    step._enabled = True
    monkeypatch.setattr(GraphedStep, "_fused_path", lambda self, lookup_is_query, keys: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: _EmulatedGraph(step, scale))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    steps, outs, before = 4 * SMALL.interval, [], list(state.clustered_len)
    for i in range(steps):
        if i == 13:  # appended outside the step object
            k, v, ck, _, _ = _step_inputs(gen, 2, h, 3, d, dtype, cluster=extras)
            for s_ in (state, twin):
                s_.append(*(t.expand(-1, -1, 3, -1) for t in (k, v)), cluster_keys=ck3(ck))
        if i == 22:
            for s_ in (state, twin):
                s_.config = dataclasses.replace(SMALL, token_budget=40, far_field_share=0.2)
        k, v, ck, q, lq = _step_inputs(gen, 2, h, group, d, dtype, cluster=extras, lookup=extras)
        out = step(k, v, q, lookup_q=lq, scale=scale, cluster_keys=ck)
        outs.append(out)
        twin.append(k, v, cluster_keys=ck)
        _check_same(state, twin, out, twin.attend(q, lookup_q=lq, scale=scale))
        assert state._seq_lens_device.tolist() == state.seq_lens
    assert state._keys.shape[2] > 80  # grew
    assert step.replays + step.captures + step.eager_steps == steps
    assert all(
        a >= b0 + 3 * SMALL.interval for a, b0 in zip(state.clustered_len, before, strict=True)
    )
    # captured after the first step, the growths and the config change; never for an update
    assert step.captures <= 4 and step.eager_steps <= step.captures + 1, (
        step.replays,
        step.captures,
        step.eager_steps,
    )
    replayed = {o.data_ptr() for o in outs if o is step._out}
    assert len(replayed) == 1  # replays return the static output


def ck3(ck):
    return None if ck is None else ck.expand(-1, -1, 3, -1)


# ---------------------------------------------------------------------- GPU (graphs)
GPU_CFG = MultipoleConfig(
    sink_tokens=4, interval=16, block_size=64, token_budget=32, backend="triton"
)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["aligned", "ragged+extras"])
def test_graphed_steps_match_an_eager_twin(gen, variant):
    """3 intervals of steps: online updates (run before a replay: no capture), a cache growth
    (capacity 200, longest 180: the 21st append grows it); "aligned": both sequences update at
    the same steps; the other: updates at different steps, lookup queries, clustering keys, a
    scale, a 3-token append made on the state directly, a beam reorder that swaps the ragged
    rows (layout rows and their lengths permuted in place: the graph keeps replaying), and a
    config change."""
    cfg, h, group, d, dtype = GPU_CFG, 2, 4, 64, torch.bfloat16
    extras = variant != "aligned"
    lengths = [180, 171] if extras else [180, 164]
    state, twin = _prefill_pair(gen, cfg, lengths, 200, h, d, dtype, "cuda", cluster=extras)
    step = GraphedStep(state)
    scale = 0.1 if extras else None
    steps, events = 3 * cfg.interval, 0
    before = list(twin.clustered_len)
    marks = (twin._fused, twin._keys)
    for i in range(steps):
        if extras and i == 10:  # appended outside the step object: it must notice
            k, v, ck, _, _ = _step_inputs(gen, 2, h, group, d, dtype, cluster=True)
            k3, v3, ck3 = (t.expand(-1, -1, 3, -1).contiguous().cuda() for t in (k, v, ck))
            for s in (state, twin):
                s.append(k3, v3, cluster_keys=ck3)
            events += 1
        if extras and i == 20:  # a beam reorder: rows swapped in place
            for s in (state, twin):
                s.select_sequences([1, 0])
        if extras and i == 30:  # a config change between steps
            for s in (state, twin):
                s.config = dataclasses.replace(cfg, token_budget=48, far_field_share=0.2)
            events += 1
        k, v, ck, q, lq = _cuda_inputs(gen, 2, h, group, d, dtype, cluster=extras, lookup=extras)
        out = step(k, v, q, lookup_q=lq, scale=scale, cluster_keys=ck).clone()
        twin.append(k, v, cluster_keys=ck)
        ref = twin.attend(q, lookup_q=lq, scale=scale)
        _check_same(state, twin, out, ref)
        if twin._fused is not marks[0] or twin._keys is not marks[1]:  # new layout or growth
            events += 1  # an eager step, then a capture
            marks = (twin._fused, twin._keys)
    assert step.failure is None, step.failure
    assert state._keys.shape[2] > 200  # grew
    assert sum(twin.clustered_len) >= sum(before) + 4 * cfg.interval  # rows may be swapped
    assert step.replays + step.captures + step.eager_steps == steps
    # each event costs an eager step and a capture at most; so does the first step
    assert step.replays >= steps - 2 * (events + 1), (step.replays, events)
    # captured at the first step, after the growth and after the config change; not for updates
    assert step.captures <= (3 if extras else 2), (step.replays, step.captures, events)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["plain", "attention-keys", "two-level"])
def test_graphed_online_updates_equal_eager_updates(gen, monkeypatch, variant):
    """Online updates replayed from CUDA graphs write the same index, bit for bit, as eager
    ones, through blocks frozen and opened, a cache growth and centroid-store growths (stores
    reallocated: captured again). "plain": the sequences update at different steps (one
    sequence's metadata), then after a beam reorder together (a second shape);
    "attention-keys": the far field's own attention-key centroids; "two-level": level 1
    refitted after the replayed level 0 (its float sums use atomics: compared to 1e-5)."""
    import multipole.index as index_mod

    monkeypatch.setattr(index_mod, "GROW_MIN", 4)  # the centroid stores grow every few updates
    cfg = GPU_CFG
    if variant == "attention-keys":
        cfg = dataclasses.replace(cfg, position_free_keys=True, far_field_keys="attention")
    if variant == "two-level":
        cfg = dataclasses.replace(cfg, levels=2, backend="auto")
    h, d, dtype = 2, 64, torch.bfloat16
    lengths = [180, 171] if variant == "plain" else [180, 164]
    state, twin = _prefill_pair(gen, cfg, lengths, 200, h, d, dtype, "cuda", cluster=True)
    twin.index.update_graphs.enabled = False
    updates = 0
    for i in range(6 * cfg.interval):
        if variant == "plain" and i == 3 * cfg.interval:
            for s in (state, twin):
                s.select_sequences([0, 0])
        k, v, ck, _, _ = _cuda_inputs(gen, 2, h, 4, d, dtype, cluster=True)
        before = list(state.clustered_len)
        for s in (state, twin):
            s.append(k, v, cluster_keys=ck)
        updates += state.clustered_len != before
        assert torch.equal(state.index.labels, twin.index.labels)
        assert (state.index.parent is None) or torch.equal(state.index.parent, twin.index.parent)
        for level, other in ((state.index.level0, twin.index.level0),
                             (state.index.level1, twin.index.level1)):  # fmt: skip
            if level is None:
                continue
            for name in ("key_centroids", "value_centroids", "sizes", "attention_key_centroids"):
                a, b = getattr(level, name), getattr(other, name)
                if level is state.index.level1 and a is not None:
                    # level 1 is fitted by PyTorch's scatter_add (atomics) in both: not bitwise
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
                    continue
                assert (a is None and b is None) or torch.equal(a, b), name
    graphs = state.index.update_graphs
    assert state._keys.shape[2] > 200 and updates >= 6
    assert graphs.enabled and graphs.captures >= 2  # the first update, then the growths
    assert graphs.captures + graphs.replays == updates and graphs.replays >= 2
    if variant == "plain":
        assert len(graphs._graphs) == 2  # one sequence's metadata, then both sequences'
    assert twin.index.update_graphs.captures == 0


@pytest.mark.gpu
@pytest.mark.parametrize("share", [1.0, 0.25])
def test_replayed_layout_refreshes_equal_eager_ones(gen, share):
    """After each online update the kernels' layout is refreshed from a CUDA graph (captured
    at the first refresh after its build) and holds what an eager refresh writes, bit for
    bit: order, centroids, sizes, offsets, live counts, lengths, budgets and the cached counts
    (a partial far field caches its clusters per row), also after a beam reorder that swaps
    the rows in place between replays; the attends agree exactly."""
    cfg = dataclasses.replace(GPU_CFG, far_field_share=share)
    h, group, d, dtype = 2, 4, 64, torch.bfloat16
    state, twin = _prefill_pair(gen, cfg, [180, 180], 400, h, d, dtype, "cuda")
    twin.index.update_graphs.enabled = False  # its layout refreshes eagerly too
    updates = 0
    for i in range(5 * cfg.interval):
        if i == 2 * cfg.interval + 3:
            for s in (state, twin):
                s.select_sequences([1, 0])
        k, v, _, q, _ = _cuda_inputs(gen, 2, h, group, d, dtype)
        before = list(state.clustered_len)
        outs = []
        for s in (state, twin):
            s.append(k, v)
            outs.append(s.attend(q))
        updates += state.clustered_len != before
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    a, b = state._fused, twin._fused
    fields = ("key_centroids", "value_centroids", "sizes", "offsets", "order", "live")
    for name in (*fields, "clustered_len", "budget"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.workspace.keys() == b.workspace.keys() and len(a.workspace) >= 1
    for name in a.workspace:
        assert torch.equal(a.workspace[name], b.workspace[name]), name
    assert updates == 5 and (a.lengths, a.budgets) == (b.lengths, b.budgets)
    assert (a.graphs.captures, a.graphs.replays) == (1, updates - 1)
    assert (b.graphs.captures, b.graphs.replays) == (0, 0)


@pytest.mark.gpu
def test_replays_do_not_sync_and_return_the_static_output(gen):
    cfg, h, group, d, dtype = GPU_CFG, 2, 4, 64, torch.bfloat16
    state, twin = _prefill_pair(gen, cfg, [200, 190], 300, h, d, dtype, "cuda")
    step = GraphedStep(state)
    inputs = [_cuda_inputs(gen, 2, h, group, d, dtype) for _ in range(5)]
    for k, v, _, q, _ in inputs[:2]:  # an eager step (warm-up), then the capture
        step(k, v, q)
    assert (step.eager_steps, step.captures) == (1, 1), step.failure
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [step(k, v, q) for k, v, _, q, _ in inputs[2:]]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert step.replays == 3
    assert len({o.data_ptr() for o in outs}) == 1  # one static output, overwritten
    for k, v, _, q, _ in inputs:
        twin.append(k, v)
        ref = twin.attend(q)
    _check_same(state, twin, outs[-1], ref)


@pytest.mark.gpu
def test_a_failed_capture_restores_the_state_and_steps_eagerly(gen):
    """A sync inside the step makes the capture fail: warned, host state restored, the step
    and every later one eager, results unchanged."""
    cfg, h, group, d, dtype = GPU_CFG, 2, 4, 64, torch.bfloat16
    state, twin = _prefill_pair(gen, cfg, [200, 190], 300, h, d, dtype, "cuda")

    def attend(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()  # not allowed while capturing
        return MultipoleState.attend(state, *args, **kwargs)

    state.attend = attend  # an instance attribute: the class check lets it through
    step = GraphedStep(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            k, v, _, q, _ = _cuda_inputs(gen, 2, h, group, d, dtype)
            out = step(k, v, q)
            twin.append(k, v)
            _check_same(state, twin, out, twin.attend(q))
    assert step.failure is not None
    assert any("capture failed" in str(w.message) for w in caught)
    assert (step.replays, step.captures, step.eager_steps) == (0, 0, 4)
