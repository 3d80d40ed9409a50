"""The model workloads the benchmarks and the memory probes share: model builders and input batches.

Every model runs at width 64 (the paper's hidden size) over a catalogue of ``n_items`` with
``max_len = L``. M2Rec gets a random, L2-normalised, frozen text table of width 384 so that its semantic
branch runs (the cost of a real all-MiniLM-L6-v2 table is identical: only its shape matters).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from m2rec_kernels._backend import resolve_backend
from m2rec_kernels.scan.cpu import cpu_scan_unavailable

from .availability import cpu_scan_note
from .grids import D_MODEL, D_STATE, TEXT_DIM

#: (model name, backend label) of every model-level row. The label is what the plots show: M2Rec on
#: each kernel backend (Triton on CUDA, the compiled scan on CPU, the PyTorch reference); Mamba4Rec on
#: whatever Mamba and scan "auto" resolves to (the label and ``impl`` say which: mixer-cpu is the
#: compiled CPU scan); SASRec on SDPA; "M2Rec, unfused" (``bench/unfused_m2rec.py``) on mamba_ssm's
#: Mamba, labelled by the scan it ran.
MODEL_CASES = (("m2rec", "triton"), ("m2rec", "cpu"), ("m2rec", "torch"), ("mamba4rec", "auto"),
               ("sasrec", "sdpa"), ("m2rec_unfused", "mamba_ssm"))
#: the streaming rows: M2Rec on each of its kernel backends
STREAM_CASES = tuple(case for case in MODEL_CASES if case[0] == "m2rec")
#: the torch.compile'd inference rows (``compiled_inference_call``): M2Rec on backend "auto" (its
#: registered ops: Triton on CUDA, the compiled scan on CPU) and its peer SASRec
COMPILED_CASES = (("m2rec", "compiled"), ("sasrec", "compiled"))


def random_text_table(n_items: int, dim: int = TEXT_DIM, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.nn.functional.normalize(torch.randn(n_items + 1, dim, generator=g), dim=1)
    table[0] = 0.0  # padding row
    return table


def build_bench_model(name: str, backend: str, n_items: int, max_len: int,
                      device: torch.device) -> Tuple[torch.nn.Module, Dict[str, str]]:
    """(model on ``device``, notes for the results) for one row of ``MODEL_CASES``."""
    from m2rec.models import build_model

    torch.manual_seed(0)
    compiled = backend == "compiled"
    if compiled and name not in ("m2rec", "sasrec"):
        raise ValueError(f"no compiled benchmark row for {name!r}")
    if name == "m2rec":
        ops_backend = "auto" if compiled else backend
        model = build_model("m2rec", n_items, d_model=D_MODEL, n_layers=1, max_len=max_len, d_state=D_STATE,
                            text_embeddings=random_text_table(n_items), backend=ops_backend)
        scan = f" ({cpu_scan_note()}; filter and fusion on torch)" if backend == "cpu" else ""
        notes = {"impl": f"M2Rec backend={ops_backend}{scan}, 1 layer, d_state {D_STATE}, causal filter, "
                         f"frozen random text table ({TEXT_DIM}-d)"}
    elif name == "mamba4rec":
        # impl="auto": the real mamba_ssm.Mamba where its CUDA scan exists, else MambaMixer, whose scan
        # (backend "auto") runs the Triton kernel on CUDA, and on CPU the compiled scan where it is built,
        # else the torch reference: the label says which (mixer-triton / mixer-cpu / mixer-torch).
        model = build_model("mamba4rec", n_items, d_model=D_MODEL, max_len=max_len, d_state=D_STATE).to(device)
        if model.mamba_impl == "mamba_ssm":
            label = "mamba_ssm"
        else:
            label = "mixer-" + resolve_backend("auto", "selective_scan", model.item_embedding.weight,
                                               cpu_kernel=cpu_scan_unavailable)
        scan = f", {cpu_scan_note()}" if label == "mixer-cpu" else ""
        notes = {"impl": f"Mamba4Rec, 1 layer, d_state {D_STATE}, Mamba = {model.mamba_impl} ({label}{scan})",
                 "backend_label": label}
    elif name == "m2rec_unfused":
        from .unfused_m2rec import UnfusedM2Rec, mamba_scan_label

        label, how = mamba_scan_label(device)
        if label is None:
            raise RuntimeError(f"M2Rec unfused cannot run on {device.type}: {how}")
        model = UnfusedM2Rec(n_items, d_model=D_MODEL, n_layers=1, max_len=max_len, d_state=D_STATE,
                             text_embeddings=random_text_table(n_items))
        notes = {"impl": f"M2Rec unfused (the paper's build): {how}; torch.fft filter; gate, residual, "
                         f"LayerNorm as torch ops; 1 layer, d_state {D_STATE}, causal filter", "backend_label": label}
    elif name == "sasrec":
        model = build_model("sasrec", n_items, d_model=D_MODEL, max_len=max_len)
        notes = {"impl": "SASRec, 2 layers, 2 heads, F.scaled_dot_product_attention"}
    else:
        raise ValueError(f"unknown benchmark model {name!r}; expected one of m2rec, mamba4rec, sasrec, m2rec_unfused")
    if compiled:
        notes["impl"] = "torch.compile(fullgraph=True) of scores(): " + notes["impl"]
    return model.to(device), notes


def random_batch(n_items: int, L: int, batch: int, device: torch.device, seed: int = 0):
    """Full-length sequences (every row has L items) with next-item targets at every position."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, n_items + 1, (batch, L + 1), generator=g)
    lengths = torch.full((batch,), L, dtype=torch.long)
    return seq[:, :L].to(device), lengths.to(device), seq[:, 1:].contiguous().to(device)


def inference_call(model: torch.nn.Module, item_seq, lengths):
    """The timed inference job: last-position scores over the whole catalogue, no autograd."""
    model.eval()

    def call():
        with torch.inference_mode():
            return model.scores(item_seq, lengths)

    return call


class Scorer(torch.nn.Module):
    """A module whose forward is ``model.scores``: what torch.compile and torch.export take for serving."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, item_seq, lengths):
        return self.model.scores(item_seq, lengths)


def compiled_inference_call(model: torch.nn.Module, item_seq, lengths, info: Dict[str, object]):
    """``inference_call`` through ``torch.compile(fullgraph=True)``, compiled here by one warm-up call
    (its seconds go to ``info["compile_s"]``), so the timing holds the compiled code only."""
    import time

    model.eval()
    compiled = torch.compile(Scorer(model), fullgraph=True)

    def call():
        with torch.inference_mode():
            return compiled(item_seq, lengths)

    t0 = time.perf_counter()
    call()
    if item_seq.is_cuda:
        torch.cuda.synchronize(item_seq.device)
    info["compile_s"] = round(time.perf_counter() - t0, 2)
    return call


def stream_step_call(model: torch.nn.Module, item_seq, lengths):
    """The timed streaming job: ``model.step`` with one new item per user (item_seq[:, -1]) on a state
    warmed by ``prefill`` of the history before it (item_seq[:, :-1]), in inference mode. Each timed call
    takes one more item on the same state: the state has a fixed size (the filter's history is a ring of
    max_len inputs), so every step costs the same whatever the number of items before it."""
    model.eval()
    with torch.inference_mode():
        _, state = model.prefill(item_seq[:, :-1], lengths - 1)
    items = item_seq[:, -1].contiguous()

    def call():
        with torch.inference_mode():
            return model.step(state, items)[0]

    return call


def train_step_call(model: torch.nn.Module, item_seq, lengths, targets):
    """One optimiser step: all-position cross-entropy (every model here is causal), backward, Adam."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def call():
        opt.zero_grad(set_to_none=True)
        loss = model.loss(item_seq, lengths, targets, all_positions=True)
        loss.backward()
        opt.step()
        return loss

    return call
