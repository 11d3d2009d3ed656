"""A safetensors file written tensor by tensor, and a seeded random Anima written that way.

``safetensors.torch.save_file`` needs every tensor in memory at once (4.2 GB of bf16 for full-size Anima, 8.4 GB if
the model was built in float32 first). :func:`write_streamed` writes the same format one tensor at a time: the
header (names, dtypes, shapes, offsets) is computed from the layout alone, then each tensor is produced, written and
dropped. :func:`write_random_anima` uses it to write a random model in the official single-file layout (``net.``
keys) while holding one submodule in float32 at a time (at most one DiT block, about 70 M parameters); it is what
the full-size CPU benchmark trains (docs/full_size_cpu.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from anima_ft.runtime import atomic_save_with, release_freed_memory

from .config import AnimaConfig
from .state_dict import OFFICIAL_PREFIX, anima_metadata, build_anima, dtype_name, strip_prefix

_ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned, as safetensors itself does


def _header_bytes(layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length prefix plus the padded JSON header for tensors stored in ``layout`` order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in layout.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % _ALIGN)
    return len(raw).to_bytes(8, "little") + raw


def write_streamed(path: str | os.PathLike, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                   produce: Callable[[], Iterator[tuple[str, torch.Tensor]]], metadata: Mapping[str, str] | None = None,
                   ) -> None:
    """Write a safetensors file whose tensors ``produce()`` yields one at a time, atomically (tmp, fsync, rename).

    ``layout`` fixes the names, shapes, dtypes and order; ``produce()`` must yield exactly those tensors in that order
    (a ValueError names the first one that differs, and nothing is left at ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _header_bytes(layout, metadata or {})

    def write(tmp: str) -> None:
        expected = iter(layout.items())
        with open(tmp, "wb") as f:
            f.write(header)
            for name, tensor in produce():
                want = next(expected, None)
                got = (tuple(tensor.shape), tensor.dtype)
                if want is None or want[0] != name or (tuple(want[1][0]), want[1][1]) != got:
                    raise ValueError(f"write_streamed({path}): produced {name} {got}, the layout says {want}")
                f.write(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
            left = next(expected, None)
            if left is not None:
                raise ValueError(f"write_streamed({path}): {left[0]} (and any after it) was never produced")

    atomic_save_with(path, write)


def _own_tensors(module: nn.Module, recurse: bool) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers of ``module`` (its children's too when ``recurse``), by local name."""
    if recurse:
        return dict(module.state_dict())
    out = {n: p for n, p in module.named_parameters(recurse=False)}
    out.update({n: b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set})
    return out


def _init_pieces(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(name, module, recurse)``: each DiT and adapter block as a whole, and every other module that owns
    tensors directly on its own, in state-dict order (so each piece's tensors can be written as soon as it is made)."""
    whole = [f"{ln}.{i}" for ln in ("blocks", "llm_adapter.blocks") if _has(model, ln)
             for i in range(len(model.get_submodule(ln)))]
    pieces: list[tuple[str, nn.Module, bool]] = [(n, model.get_submodule(n), True) for n in whole]
    for name, module in model.named_modules():
        if any(name == w or name.startswith(w + ".") for w in whole):
            continue
        if _own_tensors(module, recurse=False):
            pieces.append((name, module, False))
    order = {n: i for i, n in enumerate(model.state_dict())}

    def first_key(piece: tuple[str, nn.Module, bool]) -> int:
        prefix = f"{piece[0]}." if piece[0] else ""
        return min(order[prefix + n] for n in _own_tensors(piece[1], piece[2]))

    return sorted(pieces, key=first_key)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _reset(piece: nn.Module, where: str, recurse: bool) -> None:
    """Default PyTorch init of ``piece`` (and of its descendants when ``recurse``); each must have
    ``reset_parameters``."""
    for name, module in piece.named_modules() if recurse else [("", piece)]:
        if not _own_tensors(module, recurse=False):
            continue
        if not hasattr(module, "reset_parameters"):
            raise ValueError(f"{where}{'.' + name if name else ''} ({type(module).__name__}) has no "
                             "reset_parameters(); write_random_anima cannot initialize it")
        module.reset_parameters()


def anima_layout(cfg: AnimaConfig, dtype: torch.dtype = torch.bfloat16
                        ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{"net." + name: (shape, dtype)}`` of every tensor of the model ``cfg`` describes, in state-dict order."""
    model = build_anima(cfg, device="meta")
    return {OFFICIAL_PREFIX + n: (tuple(t.shape), dtype) for n, t in model.state_dict().items()}


def random_anima_tensors(cfg: AnimaConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """``("net." + name, tensor)`` for every tensor of a seeded, default-initialized model, in state-dict order.

    One submodule at a time is materialized in float32, initialized, cast and handed out, then freed; the order of
    the random draws is fixed by the module order, so the same ``(cfg, seed)`` gives the same tensors.
    """
    model = build_anima(cfg, device="meta")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        values: dict[str, torch.Tensor] = {}
        order = list(model.state_dict().keys())
        next_out = 0
        for where, piece, recurse in _init_pieces(model):
            piece.to_empty(device="cpu", recurse=recurse)
            _reset(piece, where, recurse)
            prefix = f"{where}." if where else ""
            for n, t in _own_tensors(piece, recurse).items():
                values[prefix + n] = t.detach().to(dtype).clone()
            piece.to_empty(device="meta", recurse=recurse)
            release_freed_memory()  # else the heap fragments and RSS grows by ~67 MB per full-size block
            while next_out < len(order) and order[next_out] in values:
                name = order[next_out]
                yield OFFICIAL_PREFIX + name, values.pop(name)
                next_out += 1
        if next_out != len(order) or values:
            raise ValueError(f"random_anima_tensors: tensors not produced in state-dict order: {order[next_out:][:3]}")
    finally:
        torch.random.set_rng_state(gen_state)


def write_random_anima(path: str | os.PathLike, cfg: AnimaConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       ) -> int:
    """Write a seeded random model in the official single-file layout, tensor by tensor; returns its parameter count.

    The file carries the config in its metadata like :func:`~anima_ft.model.state_dict.save_anima`'s, so
    ``load_anima`` reads it back with the same checks as an official file.
    """
    layout = anima_layout(cfg, dtype)
    meta = anima_metadata(cfg, {"anima_ft.random_seed": seed})
    write_streamed(path, layout, lambda: random_anima_tensors(cfg, seed, dtype), meta)
    return sum(torch.Size(shape).numel() for shape, _ in layout.values())


def save_anima_streamed(cfg: AnimaConfig, tensors: Mapping[str, object], path: str | os.PathLike,
                        metadata: Mapping[str, str] | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
    """What :func:`~anima_ft.model.state_dict.save_anima` writes (official names, ``dtype``, the config and
    ``metadata`` in the header), from ``{internal name: tensor}`` without building the model: each tensor is cast
    and written on its own. Values may be lazy (anything with ``.contiguous()`` that returns a tensor, such as
    DeepSpeed's ``GatheredTensor``); a missing name is a ValueError before anything is written."""
    layout = anima_layout(cfg, dtype)
    missing = [n for n in layout if strip_prefix(n) not in tensors]
    if missing:
        raise ValueError(f"save_anima_streamed({path}): {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    meta = anima_metadata(cfg, metadata)

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for name in layout:
            value = tensors[strip_prefix(name)]
            tensor = value if isinstance(value, torch.Tensor) else value.contiguous()
            yield name, tensor.detach().to("cpu", dtype)

    write_streamed(path, layout, produce, meta)
