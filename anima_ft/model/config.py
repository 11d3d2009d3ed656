"""Model configuration: the DiT and LLM-adapter hyperparameters, the tensor layout they imply, and the inverse
(the config a checkpoint's tensor shapes imply, with every tensor that disagrees named).

Defaults are full-size Anima (Cosmos-Predict2-2B + 6-layer adapter), see docs/model.md#sizes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class AdapterConfig:
    """The LLM adapter (`net.llm_adapter.*`): T5 ids (queries) cross-attending to Qwen3 hidden states."""

    source_dim: int = 1024
    """Width of the Qwen3 hidden states (the cross-attention key/value input)."""
    model_dim: int = 1024
    """Adapter width; equals the output (T5-like context) width, so there is no `in_proj`."""
    num_layers: int = 6
    """Number of adapter transformer blocks."""
    num_heads: int = 16
    """Attention heads (head dim = model_dim / num_heads = 64 for Anima)."""
    mlp_hidden: int = 4096
    """Hidden width of each block's MLP (mlp.0 / mlp.2)."""
    vocab_size: int = 32128
    """Rows of the T5 token embedding table."""
    rope_theta: float = 10000.0
    """Base of the 1D RoPE applied in both attentions (separate position spaces for source and target)."""
    eps: float = 1e-6
    """Epsilon of every RMSNorm in the adapter."""

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads


@dataclass
class AnimaConfig:
    """The Cosmos-Predict2 DiT ("MiniTrainDIT") plus an optional LLM adapter."""

    model_channels: int = 2048
    """DiT width D."""
    num_blocks: int = 28
    """Number of DiT blocks (28 for Anima; community variants have 40 or 52)."""
    num_heads: int = 16
    """Attention heads (head dim D / num_heads = 128)."""
    in_channels: int = 16
    """Latent channels (the padding-mask channel is added on top: patch-embed input is (in+1)*p*p)."""
    out_channels: int = 16
    """Predicted velocity channels."""
    patch_spatial: int = 2
    """Spatial patch size p (patch_temporal is fixed at 1)."""
    crossattn_emb_channels: int = 1024
    """Context width (the adapter's output width)."""
    mlp_ratio: float = 4.0
    """MLP hidden = mlp_ratio * D."""
    adaln_lora_dim: int = 256
    """Rank of the adaLN-LoRA modulation."""
    rope_extrapolation: tuple[float, float, float] = (1.0, 4.0, 4.0)
    """NTK extrapolation ratios (t, h, w) of the 3D RoPE."""
    context_tokens: int = 512
    """The context is zero-padded to at least this many tokens (never masked, docs/model.md#context)."""
    eps: float = 1e-6
    """Epsilon of the LayerNorms and RMSNorms."""
    adapter: AdapterConfig | None = field(default_factory=AdapterConfig)
    """The LLM adapter; None for a bare DiT."""

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.model_channels * self.mlp_ratio)

    def validate(self) -> None:
        """Raise ValueError on out-of-range or inconsistent hyperparameters (naming the field and the value)."""
        _check_ranges(self, "")
        if self.adapter is not None:
            _check_ranges(self.adapter, "adapter.")
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} gives an MLP hidden width of {self.mlp_hidden}; "
                             "it must be >= 1")
        if self.model_channels % self.num_heads:
            raise ValueError(f"model_channels={self.model_channels} is not divisible by num_heads={self.num_heads}")
        hd = self.head_dim
        dim_hw = hd // 6 * 2
        if dim_hw % 2 or (hd - 2 * dim_hw) % 2 or dim_hw <= 2:
            raise ValueError(f"head dim {hd} (model_channels={self.model_channels} / num_heads={self.num_heads}) "
                             f"cannot be split into even 3D-RoPE parts (h=w={dim_hw}, t={hd - 2 * dim_hw})")
        if self.adapter is not None:
            a = self.adapter
            if a.model_dim != self.crossattn_emb_channels:
                raise ValueError(
                    f"adapter.model_dim={a.model_dim} must equal crossattn_emb_channels={self.crossattn_emb_channels}"
                )
            if a.model_dim % a.num_heads or a.head_dim % 2:
                raise ValueError(f"adapter model_dim={a.model_dim} / num_heads={a.num_heads} must give an even head dim")

    def to_dict(self) -> dict:
        """Plain-dict form (for checkpoint metadata)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> AnimaConfig:
        """Inverse of :meth:`to_dict`; unknown keys and values of the wrong type are a ValueError naming the key."""
        if not isinstance(d, Mapping):
            raise ValueError(f"an AnimaConfig must be a mapping of field -> value, got {type(d).__name__}")
        d = dict(d)
        adapter = d.pop("adapter", None)
        if adapter is not None and not isinstance(adapter, Mapping):
            raise ValueError(f"AnimaConfig key 'adapter' must be a mapping or null, got {adapter!r}")
        adapter_cfg = None if adapter is None else AdapterConfig(**_typed_fields(AdapterConfig, adapter, "adapter."))
        return cls(**_typed_fields(cls, d, ""), adapter=adapter_cfg)

    @classmethod
    def tiny(cls, num_blocks: int = 2, with_adapter: bool = True) -> AnimaConfig:
        """A tiny Anima-shaped config for tests and the CPU demo (real T5 vocabulary, 512 context tokens)."""
        return cls(
            model_channels=64,
            num_blocks=num_blocks,
            num_heads=4,
            crossattn_emb_channels=32,
            adaln_lora_dim=16,
            adapter=AdapterConfig(source_dim=32, model_dim=32, num_layers=2, num_heads=2, mlp_hidden=128)
            if with_adapter
            else None,
        )


def _typed_fields(cls, d: Mapping, where: str) -> dict:
    """``d`` checked against the field types of the dataclass ``cls`` (taken from each field's default)."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls) if f.name != "adapter"}
    bad = sorted(set(d) - set(defaults))
    if bad:
        raise ValueError(f"unknown {cls.__name__} keys {[where + k for k in bad]}; valid keys: {sorted(defaults)}")
    out = {}
    for key, value in d.items():
        default = defaults[key]
        if isinstance(default, tuple):
            ok = isinstance(value, (list, tuple)) and len(value) == len(default) and all(_is_number(v) for v in value)
            value = tuple(float(v) for v in value) if ok else value
        elif isinstance(default, float):
            ok = _is_number(value)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"{cls.__name__} key {where + key!r} must be {_type_words(default)}, got {value!r}")
        out[key] = value
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_words(default) -> str:
    if isinstance(default, tuple):
        return f"a list of {len(default)} numbers"
    return "a number" if isinstance(default, float) else "an integer"


def _check_ranges(cfg, where: str) -> None:
    """Every integer hyperparameter >= 1 (``context_tokens`` >= 0), every epsilon and RoPE number > 0."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "adapter" or value is None:
            continue
        low = 0 if f.name == "context_tokens" else 1
        if isinstance(value, int) and value < low:
            raise ValueError(f"{where}{f.name}={value} must be >= {low}")
        if isinstance(value, float) and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{where}{f.name}={value} must be a finite number > 0")
        if isinstance(value, tuple) and not all(v > 0 and math.isfinite(v) for v in value):
            raise ValueError(f"{where}{f.name}={list(value)} must be all finite and > 0")


# --- The official tensor layout and the config it implies ----------------------------------------------------------
#
# Each tensor's shape in symbols; a leading factor multiplies ("3D" = 3 * D):
#   D  model_channels    hd DiT head dim (D / num_heads)    Cc crossattn_emb_channels    H  DiT MLP hidden
#   R  adaln_lora_dim    X  x_embedder input width (in_channels + 1) * p * p     O  final width p * p * out_channels
#   C  adapter.model_dim   S adapter.source_dim   ha adapter head dim   HA adapter.mlp_hidden   V adapter.vocab_size
# DiT block i holds "blocks.{i}." + each _DIT_BLOCK key; adapter block j "llm_adapter.blocks.{j}." + each
# _ADAPTER_BLOCK key.

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
"""safetensors dtypes a weight may have (anything else, e.g. I32 or BOOL, is a damaged or foreign file)."""

_DIT_TOP = {"x_embedder.proj.1.weight": "D X", "t_embedder.1.linear_1.weight": "D D",
            "t_embedder.1.linear_2.weight": "3D D", "t_embedding_norm.weight": "D"}
_DIT_BLOCK = {
    **{f"self_attn.{p}_proj.weight": "D D" for p in ("q", "k", "v", "output")},
    "self_attn.q_norm.weight": "hd", "self_attn.k_norm.weight": "hd",
    "cross_attn.q_proj.weight": "D D", "cross_attn.k_proj.weight": "D Cc", "cross_attn.v_proj.weight": "D Cc",
    "cross_attn.output_proj.weight": "D D", "cross_attn.q_norm.weight": "hd", "cross_attn.k_norm.weight": "hd",
    "mlp.layer1.weight": "H D", "mlp.layer2.weight": "D H",
    **{f"adaln_modulation_{m}.{i}.weight": spec for m in ("self_attn", "cross_attn", "mlp")
       for i, spec in ((1, "R D"), (2, "3D R"))},
}
_DIT_FINAL = {"final_layer.adaln_modulation.1.weight": "R D", "final_layer.adaln_modulation.2.weight": "2D R",
              "final_layer.linear.weight": "O D"}
_ADAPTER_TOP = {"llm_adapter.embed.weight": "V C", "llm_adapter.out_proj.weight": "C C",
                "llm_adapter.out_proj.bias": "C", "llm_adapter.norm.weight": "C"}
_ADAPTER_BLOCK = {
    "norm_self_attn.weight": "C", **{f"self_attn.{p}_proj.weight": "C C" for p in "qkvo"},
    "self_attn.q_norm.weight": "ha", "self_attn.k_norm.weight": "ha", "norm_cross_attn.weight": "C",
    "cross_attn.q_proj.weight": "C C", "cross_attn.k_proj.weight": "C S", "cross_attn.v_proj.weight": "C S",
    "cross_attn.o_proj.weight": "C C", "cross_attn.q_norm.weight": "ha", "cross_attn.k_norm.weight": "ha",
    "norm_mlp.weight": "C", "mlp.0.weight": "HA C", "mlp.0.bias": "HA", "mlp.2.weight": "C HA", "mlp.2.bias": "C",
}
_DIM_RE = re.compile(r"(\d*)([A-Za-z]+)")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_ADAPTER_BLOCK_RE = re.compile(r"^llm_adapter\.blocks\.(\d+)\.")
_SHAPE_FIELDS = ("model_channels", "num_blocks", "num_heads", "in_channels", "out_channels", "patch_spatial",
                 "crossattn_emb_channels", "adaln_lora_dim")
_ADAPTER_SHAPE_FIELDS = ("source_dim", "model_dim", "num_layers", "num_heads", "mlp_hidden", "vocab_size")
_LIST_LIMIT = 50  # tensors named per kind of problem in a message; the rest are counted

Dims = tuple[tuple[int, str], ...]


def _parse_dims(spec: str) -> Dims:
    return tuple((int(m.group(1) or 1), m.group(2)) for m in _DIM_RE.finditer(spec))


def layout_dims(num_blocks: int, adapter_layers: int | None) -> dict[str, Dims]:
    """Every tensor name (no ``net.``) of an Anima with these block counts -> its dims as ``(factor, symbol)``.

    ``adapter_layers=None`` is a bare DiT. The symbols are listed above this function in the source.
    """
    table = dict(_DIT_TOP)
    for i in range(num_blocks):
        table.update({f"blocks.{i}.{k}": v for k, v in _DIT_BLOCK.items()})
    table.update(_DIT_FINAL)
    if adapter_layers is not None:
        table.update(_ADAPTER_TOP)
        for j in range(adapter_layers):
            table.update({f"llm_adapter.blocks.{j}.{k}": v for k, v in _ADAPTER_BLOCK.items()})
    return {name: _parse_dims(spec) for name, spec in table.items()}


def symbol_values(cfg: AnimaConfig) -> dict[str, int]:
    """The value of each layout symbol for ``cfg``."""
    p2 = cfg.patch_spatial ** 2
    values = {"D": cfg.model_channels, "hd": cfg.head_dim, "Cc": cfg.crossattn_emb_channels, "H": cfg.mlp_hidden,
              "R": cfg.adaln_lora_dim, "X": (cfg.in_channels + 1) * p2, "O": p2 * cfg.out_channels}
    if cfg.adapter is not None:
        a = cfg.adapter
        values.update(C=a.model_dim, S=a.source_dim, ha=a.head_dim, HA=a.mlp_hidden, V=a.vocab_size)
    return values


def expected_shapes(cfg: AnimaConfig) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every tensor of the model ``cfg`` describes (equal to ``build_anima(cfg).state_dict()``)."""
    values = symbol_values(cfg)
    dims = layout_dims(cfg.num_blocks, None if cfg.adapter is None else cfg.adapter.num_layers)
    return {name: tuple(f * values[s] for f, s in d) for name, d in dims.items()}


@dataclass
class LayoutReport:
    """Every way a set of tensors differs from an Anima layout; each entry names the tensor, expected and found."""

    missing: list[tuple[str, str]] = field(default_factory=list)
    """``(name, expected shape)`` of tensors the layout needs and the file lacks."""
    unexpected: list[tuple[str, str]] = field(default_factory=list)
    """``(name, found shape and dtype)`` of tensors the layout does not have."""
    wrong_shape: list[tuple[str, str, str]] = field(default_factory=list)
    """``(name, found shape, expected shape)``."""
    wrong_dtype: list[tuple[str, str]] = field(default_factory=list)
    """``(name, found dtype)`` of tensors that are not floating point."""
    config: list[str] = field(default_factory=list)
    """Problems of the implied config as a whole (e.g. a head dim that does not divide the width)."""

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype or self.config)

    def tensor_names(self) -> set[str]:
        """The names of every tensor this report blames."""
        return {e[0] for e in (*self.missing, *self.unexpected, *self.wrong_shape, *self.wrong_dtype)}

    def message(self) -> str:
        """One line: each kind of problem with its count and up to 50 tensors (name, found, expected)."""
        parts = []
        kinds = (("missing", self.missing, lambda e: f"{e[0]} (expected {e[1]})"),
                 ("wrong shape", self.wrong_shape, lambda e: f"{e[0]} (found {e[1]}, expected {e[2]})"),
                 ("wrong dtype", self.wrong_dtype,
                  lambda e: f"{e[0]} (found {e[1]}, expected one of {', '.join(FLOAT_DTYPES)})"),
                 ("unexpected", self.unexpected, lambda e: f"{e[0]} (found {e[1]})"))
        for label, entries, fmt in kinds:
            if entries:
                shown = ", ".join(fmt(e) for e in entries[:_LIST_LIMIT])
                more = f" ... (+{len(entries) - _LIST_LIMIT} more)" if len(entries) > _LIST_LIMIT else ""
                parts.append(f"{len(entries)} {label}: {shown}{more}")
        parts += self.config
        return "; ".join(parts)


def _shape_text(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _compare(dims: Mapping[str, Dims], values: Mapping[str, int], shapes: Mapping[str, Sequence[int]],
             dtypes: Mapping[str, str] | None) -> LayoutReport:
    report = LayoutReport()
    for name, spec in dims.items():
        expected = [f * values[s] if s in values else None for f, s in spec]
        if name not in shapes:
            report.missing.append((name, _shape_text(expected)))
            continue
        found = [int(n) for n in shapes[name]]
        if len(found) != len(expected) or any(e is not None and e != n for e, n in zip(expected, found)):
            report.wrong_shape.append((name, _shape_text(found), _shape_text(expected)))
        if dtypes is not None and dtypes[name] not in FLOAT_DTYPES:
            report.wrong_dtype.append((name, dtypes[name]))
    for name in shapes:
        if name not in dims:
            dtype = f" {dtypes[name]}" if dtypes is not None else ""
            report.unexpected.append((name, _shape_text(list(shapes[name])) + dtype))
    return report


def check_layout(cfg: AnimaConfig, shapes: Mapping[str, Sequence[int]],
                 dtypes: Mapping[str, str] | None = None) -> LayoutReport:
    """Compare ``{name: shape}`` (and safetensors dtype names, when given) with the tensors ``cfg`` implies."""
    layers = None if cfg.adapter is None else cfg.adapter.num_layers
    if cfg.num_blocks + (layers or 0) > max(len(shapes), 256):  # e.g. a corrupted num_blocks: do not list 10^9 names
        return LayoutReport(config=[f"the config has {cfg.num_blocks} DiT blocks and {layers or 0} adapter blocks, "
                                    f"more than {len(shapes)} tensors can hold"])
    return _compare(layout_dims(cfg.num_blocks, layers), symbol_values(cfg), shapes, dtypes)


def _num_blocks(pattern: re.Pattern, names: Sequence[str]) -> int:
    # An index beyond the tensor count cannot be a real block (each has >= 16 tensors); counting it would make
    # every block in between "missing" (a corrupted name such as blocks.99999999.) -- its tensors are "unexpected".
    indices = [int(m.group(1)) for n in names if (m := pattern.match(n))]
    return 1 + max((i for i in indices if i < len(names)), default=-1)


def inspect_layout(shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, str] | None = None,
                   base: AnimaConfig | None = None) -> tuple[AnimaConfig | None, LayoutReport]:
    """The config the tensor shapes imply, and every tensor that disagrees with it.

    Each hyperparameter is the most common value among all the tensor dims that carry it (ties: the first tensor in
    layout order), so one damaged tensor cannot change the inferred config and is reported by name instead. Block
    counts are 1 + the largest block index. Fields no shape carries (epsilons, RoPE settings, ``context_tokens``,
    ``patch_spatial``) come from ``base`` (default: :class:`AnimaConfig` defaults). The config is None when the
    shapes imply none (the report then says why).
    """
    base = base or AnimaConfig()
    names = list(shapes)
    num_blocks = _num_blocks(_BLOCK_RE, names)
    has_adapter = any(n.startswith("llm_adapter.") for n in names)
    layers = _num_blocks(_ADAPTER_BLOCK_RE, names) if has_adapter else None
    dims = layout_dims(num_blocks, layers)
    votes: dict[str, Counter] = {}
    for name, spec in dims.items():
        shape = shapes.get(name)
        if shape is None or len(shape) != len(spec):
            continue
        for (factor, symbol), n in zip(spec, shape):
            if factor == 1:
                votes.setdefault(symbol, Counter())[int(n)] += 1
    values = {symbol: counter.most_common(1)[0][0] for symbol, counter in votes.items()}
    report = _compare(dims, values, shapes, dtypes)
    if num_blocks == 0:
        report.config.append("no DiT block tensors (blocks.N.*) at all")
    needed = ("D", "hd", "Cc", "H", "R", "X", "O") + (("C", "S", "ha", "HA", "V") if has_adapter else ())
    if num_blocks == 0 or any(s not in values for s in needed):
        return None, report  # the tensors that would carry the missing values are reported missing
    cfg = _config_from_values(values, num_blocks, layers, base, report)
    return cfg, report


def _config_from_values(v: Mapping[str, int], num_blocks: int, layers: int | None, base: AnimaConfig,
                        report: LayoutReport) -> AnimaConfig | None:
    p2 = base.patch_spatial ** 2
    before = len(report.wrong_shape) + len(report.config)
    if v["X"] % p2 or v["X"] // p2 < 2:
        report.wrong_shape.append(("x_embedder.proj.1.weight", f"[{v['D']}, {v['X']}]",
                                   f"[{v['D']}, (in_channels + 1) * {p2}] with in_channels >= 1"))
    if v["O"] % p2:
        report.wrong_shape.append(("final_layer.linear.weight", f"[{v['O']}, {v['D']}]",
                                   f"[{p2} * out_channels, {v['D']}]"))
    if v["D"] % v["hd"]:
        report.config.append(f"the q_norm/k_norm width {v['hd']} (the head dim, e.g. blocks.0.self_attn.q_norm.weight) "
                             f"does not divide model_channels {v['D']}")
    if int(v["D"] * (v["H"] / v["D"])) != v["H"]:
        report.config.append(f"MLP hidden {v['H']} (blocks.N.mlp.layer1.weight) is not representable as "
                             f"mlp_ratio * model_channels {v['D']}")
    if layers is not None and v["C"] % v["ha"]:
        report.config.append(f"the adapter q_norm/k_norm width {v['ha']} (llm_adapter.blocks.0.self_attn.q_norm."
                             f"weight) does not divide adapter model_dim {v['C']}")
    if len(report.wrong_shape) + len(report.config) > before:
        return None
    adapter = None
    if layers is not None:
        a = base.adapter or AdapterConfig()
        adapter = AdapterConfig(source_dim=v["S"], model_dim=v["C"], num_layers=layers, num_heads=v["C"] // v["ha"],
                                mlp_hidden=v["HA"], vocab_size=v["V"], rope_theta=a.rope_theta, eps=a.eps)
    cfg = dataclasses.replace(
        base, model_channels=v["D"], num_blocks=num_blocks, num_heads=v["D"] // v["hd"],
        in_channels=v["X"] // p2 - 1, out_channels=v["O"] // p2, crossattn_emb_channels=v["Cc"],
        mlp_ratio=v["H"] / v["D"], adaln_lora_dim=v["R"], adapter=adapter)
    try:
        cfg.validate()
    except ValueError as exc:
        report.config.append(f"the config the shapes imply is invalid: {exc} (the head dim is the width of the "
                             "q_norm/k_norm tensors, e.g. blocks.0.self_attn.q_norm.weight)")
        return None
    return cfg


def infer_config(shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, str] | None = None,
                 where: str = "checkpoint") -> AnimaConfig:
    """Infer an :class:`AnimaConfig` from ``{name: shape}`` (names WITHOUT the ``net.`` prefix) and check every tensor.

    ``dtypes`` (safetensors names such as ``BF16``) adds a dtype check. Any missing, unexpected, mis-shaped or
    non-float tensor raises one ``ValueError`` that lists them all (:func:`inspect_layout` says how the config is
    chosen). Block counts are counted from the keys (28, 40 or 52 DiT blocks all work).
    """
    cfg, report = inspect_layout(shapes, dtypes)
    if report or cfg is None:
        raise ValueError(f"{where} does not hold an Anima model: {report.message()}")
    return cfg


def shape_field_differences(stored: AnimaConfig, inferred: AnimaConfig) -> list[tuple[str, object, object]]:
    """``(field, stored value, inferred value)`` for every shape-determining field where the two configs differ."""
    out = [(name, getattr(stored, name), getattr(inferred, name)) for name in _SHAPE_FIELDS
           if getattr(stored, name) != getattr(inferred, name)]
    # the ratio disagrees only if, applied to the tensors' width, it gives another hidden width (4.0 vs 4.001 agree)
    if not math.isfinite(stored.mlp_ratio) or int(inferred.model_channels * stored.mlp_ratio) != inferred.mlp_hidden:
        out.append(("mlp_ratio", stored.mlp_ratio, inferred.mlp_ratio))
    if (stored.adapter is None) != (inferred.adapter is None):
        out.append(("adapter", "none" if stored.adapter is None else "present",
                    "none" if inferred.adapter is None else "present"))
    elif stored.adapter is not None:
        for name in _ADAPTER_SHAPE_FIELDS:
            a, b = getattr(stored.adapter, name), getattr(inferred.adapter, name)
            if a != b:
                out.append((f"adapter.{name}", a, b))
    return out
