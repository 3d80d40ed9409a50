"""The baseline "M2Rec, unfused": M2Rec built the way the paper's released code builds its layer.

The paper's code (yyyx6787/M2ReC: ``mmamba4rec.py`` and the ``mamba_simple.py`` it vendors, read to
learn how the layer is put together, nothing copied) runs mamba_ssm's ``Mamba`` on its slow path
(``use_fast_path=False``: ``nn.Conv1d`` for the short convolution, then ``selective_scan_fn``, which is
mamba's CUDA scan on a GPU), does its Fourier filtering with ``torch.fft`` (rfft, a multiply, irfft),
and composes everything else (dropout, residual, LayerNorm, feed-forward) from separate torch ops.

``UnfusedM2Rec`` is exactly our ``M2Rec`` — same constructor, same parameters (``load_state_dict``
moves them either way), same function — with the layer body built that way:

    m = mamba_ssm.Mamba(h)                               (its parameters are the layer's MambaMixer's)
    f = irfft(rfft(h, n, norm="ortho") * W, n, norm="ortho")[:, :L]   with W = rfft(k[:L], n) (causal)
                                                          or the learned complex weight (circular)
    alpha = softmax(Linear(cat(m, f, s)));  o = sum_i alpha_i * branch_i
    h = LayerNorm(h + dropout(o));  h = FeedForward(h)   (torch ops, one kernel each)

Where the scan runs (``mamba_scan_label``): "mamba_ssm" — mamba's CUDA kernel (a CUDA device and the
``selective_scan_cuda`` extension, e.g. the one ``bench/build_mamba_scan.py`` builds); "mamba_ssm_ref" —
on CPU, mamba_ssm's own PyTorch ``selective_scan_ref`` through ``m2rec.mamba_ssm_compat`` (what the
paper's code computes there; it materialises (batch, d_inner, L, N) tensors). On a CUDA device without
the extension the row is not run: a reference scan on a GPU would be a straw man, not the paper's layer.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from m2rec.mamba_ssm_compat import import_mamba_ssm, tie_mamba_ssm
from m2rec.models import M2Rec
from m2rec_kernels.freq_filter import causal_n_fft


def mamba_scan_label(device: torch.device) -> Tuple[Optional[str], str]:
    """(label, description) of the scan the unfused model runs on ``device``; label None with the
    reason as description when it cannot run there."""
    mamba_ssm, how = import_mamba_ssm()
    if mamba_ssm is None:
        return None, how
    if device.type == "cuda":
        if how != "cuda":
            return None, ("mamba_ssm's CUDA scan (selective_scan_cuda) is not installed on this GPU machine: build it "
                          "with 'python3 tasks.py build-mamba-scan' and carry it (README, gpu-check)")
        return "mamba_ssm", "mamba_ssm.Mamba slow path, selective_scan_fn on mamba's CUDA kernel"
    if how == "cuda":
        return None, "mamba_ssm's CUDA scan is installed, so its Mamba cannot run on CPU tensors"
    return "mamba_ssm_ref", "mamba_ssm.Mamba slow path, selective_scan_ref (mamba_ssm's PyTorch scan) on CPU"


def torch_fft_filter(filt, x: torch.Tensor) -> torch.Tensor:
    """The frequency branch with torch.fft, as FMLP-Rec's FilterLayer and the paper's code do it."""
    L = x.shape[1]
    if filt.mode == "causal":
        n_fft = causal_n_fft(L, L)
        weight = torch.fft.rfft(filt.kernel[:L].float(), n=n_fft, dim=0)
    else:
        n_fft = L
        weight = torch.view_as_complex(filt.complex_weight.float())
    spectrum = torch.fft.rfft(x.float(), n=n_fft, dim=1, norm="ortho")
    return torch.fft.irfft(spectrum * weight, n=n_fft, dim=1, norm="ortho")[:, :L].to(x.dtype)


class UnfusedM2Rec(M2Rec):
    """``M2Rec`` (same arguments, parameters and function) with the paper's unfused layer body."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("backend", "torch")  # unused by the unfused body; keeps the parent's ops off Triton
        super().__init__(*args, **kwargs)
        self._twins: dict = {}  # layer index -> mamba_ssm.Mamba tied to that layer's MambaMixer

    def _mamba(self, index: int, layer) -> torch.nn.Module:
        twin = tie_mamba_ssm(layer.mamba, self._twins.get(index), use_fast_path=False)
        self._twins[index] = twin
        return twin

    def _layer(self, index: int, layer, h: torch.Tensor, s: Optional[torch.Tensor]) -> torch.Tensor:
        branches = [self._mamba(index, layer)(h)]
        if layer.filter is not None:
            branches.append(torch_fft_filter(layer.filter, h))
        if layer.semantic:
            branches.append(s.to(h.dtype))
        norm = layer.fusion_norm
        if len(branches) == 1:
            mixed = branches[0]
        else:
            alpha = torch.softmax(F.linear(torch.cat(branches, dim=-1), layer.gate_weight, layer.gate_bias), dim=-1)
            mixed = sum(alpha[..., i:i + 1] * b for i, b in enumerate(branches))
        fused = F.layer_norm(h + F.dropout(mixed, layer.dropout_p, self.training), norm.normalized_shape,
                             norm.weight, norm.bias, norm.eps)
        return layer.ffn(fused)

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        label, why = mamba_scan_label(item_seq.device)
        if label is None:
            raise RuntimeError(f"UnfusedM2Rec cannot run on {item_seq.device}: {why}")
        if self.filter_mode == "circular" and self.use_frequency and item_seq.shape[1] != self.max_len:
            raise ValueError(f"UnfusedM2Rec: with filter='circular' item_seq must have exactly max_len = "
                             f"{self.max_len} positions, got L = {item_seq.shape[1]}")
        h = self.embedding_norm(self.embedding_dropout(self.item_embedding(item_seq)))
        s = self.semantic_stream(item_seq) if self.use_semantic else None
        for i, layer in enumerate(self.layers):
            h = self._layer(i, layer, h, s)
        return h
