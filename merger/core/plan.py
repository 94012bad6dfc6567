"""The merge plan (pure): which output tensor comes from which base tensor through which steps.

Built from the base's tensor table (names, dtypes, shapes), its config and the parsed adapters, before
any weight is read, so every bad input (wrong shapes, ranks, modules) is refused before anything is
written, and the writer knows every output tensor's dtype and shape up front.

Tied embeddings: when the base ties `lm_head` to the input embedding (no `lm_head.weight` stored) and
an adapter changes only one of the two, the output unties them and stores both (PEFT's in-place
merge would change both, which is not what the adapter computed). Trainable tokens are tied by PEFT
itself, so they change both and the output stays tied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from merger.core.lora import LoraModule, ParsedAdapter, TokenRows
from merger.errors import ShapeMismatchError, UnsupportedAdapterError

_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
_TORCH_TO_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


@dataclass(frozen=True)
class Replace:
    tensor: object  # torch.Tensor; the adapter's full new value (modules_to_save, trained bias)
    adapter: str


@dataclass(frozen=True)
class AddLora:
    module: LoraModule  # adds s*B@A (DoRA: rescales by magnitude / ||W0 + dW||)
    adapter: str


@dataclass(frozen=True)
class AddLoraBias:
    module: LoraModule  # adds s * lora_B.bias
    adapter: str


@dataclass(frozen=True)
class SetRows:
    rows: TokenRows
    adapter: str


@dataclass(frozen=True)
class Combine:
    """Adds combine(method, [dW_i]) over the adapters that touch this tensor (weight 0 for the rest)."""

    method: str
    modules: tuple  # per adapter: LoraModule or None
    weights: tuple[float, ...]
    density: float
    seed: int
    bias: bool = False  # combine the lora_B biases instead of the weights


Step = Union[Replace, AddLora, AddLoraBias, SetRows, Combine]


def step_tensors(step: Step) -> list:
    """The adapter tensors a step reads (so their memory can be let go once the step has run)."""
    def module(m: Optional[LoraModule]) -> list:
        return [] if m is None else [t for t in (m.A, m.B, m.bias, m.magnitude) if t is not None]

    if isinstance(step, Replace):
        return [step.tensor]
    if isinstance(step, (AddLora, AddLoraBias)):
        return module(step.module)
    if isinstance(step, SetRows):
        return [step.rows.values]
    return [t for m in step.modules for t in module(m)]


@dataclass(frozen=True)
class TensorTask:
    name: str  # output tensor name
    source: str  # base tensor name it is computed from
    src_dtype: str  # safetensors dtype names
    out_dtype: str
    shape: tuple[int, ...]
    steps: tuple = ()
    nf4: bool = False
    nf4_transposed: bool = False  # quantize the (out, in) view of a Conv1D (in, out) weight

    @property
    def passthrough(self) -> bool:
        return not self.steps and not self.nf4


@dataclass(frozen=True)
class MergePlan:
    tasks: tuple[TensorTask, ...]
    untied: bool = False  # lm_head.weight is written although the base tied it
    tie_word_embeddings: Optional[bool] = None  # the value for the output config (None: unchanged)
    notes: tuple[str, ...] = ()
    adapters_bytes: int = 0
    used: dict = field(default_factory=dict)  # adapter -> count of adapter parts consumed


@dataclass(frozen=True)
class PlanOptions:
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    combine: str = "sequential"
    weights: Optional[tuple[float, ...]] = None
    density: float = 0.5
    seed: int = 0
    qlora_base: str = "original"  # original | nf4


def _resolve(name: str, tensors: dict) -> Optional[str]:
    """A PEFT module parameter name -> the base checkpoint's tensor name (prefixes may differ)."""
    if name in tensors:
        return name
    head, _, rest = name.partition(".")
    candidates = [rest] if head in ("model", "transformer") else []
    candidates += [f"model.{name}", f"transformer.{name}"]
    return next((c for c in candidates if c in tensors), None)


def find_tied_embedding(tensors: dict, config: dict) -> Optional[str]:
    """The stored input embedding that `lm_head` is tied to, or None when lm_head is stored/untied."""
    if "lm_head.weight" in tensors or config.get("tie_word_embeddings", True) is False:
        return None
    return next((n for n in tensors if n.endswith(_EMBED_SUFFIXES)), None)


def _same_steps(a: list, b: list) -> bool:
    """Identity, not value, comparison: steps hold tensors, and tied steps share their payload."""
    def payload(step):
        return step.rows if isinstance(step, SetRows) else step

    return len(a) == len(b) and all(type(x) is type(y) and payload(x) is payload(y) for x, y in zip(a, b))


def build_plan(tensors: dict, config: dict, adapters: list[ParsedAdapter], options: PlanOptions) -> MergePlan:
    """`tensors`: base tensor name -> object with .dtype (safetensors name) and .shape."""
    tied_to = find_tied_embedding(tensors, config)
    table = dict(tensors)
    if tied_to:
        table["lm_head.weight"] = tensors[tied_to]  # a virtual tensor, written only when it changes
    steps: dict[str, list[Step]] = {}
    used: dict[str, int] = {}
    sources = {n: (tied_to if (tied_to and n == "lm_head.weight") else n) for n in table}
    combining = options.combine != "sequential" and len(adapters) > 1

    def target(adapter: str, param: str, shape: tuple) -> str:
        name = _resolve(param, table)
        if name is None and param.endswith(".bias") and _resolve(param[:-5] + ".weight", table):
            raise UnsupportedAdapterError(
                f"adapter {adapter} trains a bias for {param[:-5]}, but that base layer has no bias",
                "a merged checkpoint cannot add a bias the architecture lacks; serve it as an adapter")
        if name is None:
            raise ShapeMismatchError(
                f"adapter {adapter} changes {param}, which the base checkpoint does not have",
                "the adapter was made for another base model; merge it into the model it was trained on")
        base_shape = tuple(table[name].shape)
        if tuple(shape) != base_shape:
            raise ShapeMismatchError(
                f"adapter {adapter} changes {name} with shape {tuple(shape)} but the base has {base_shape}",
                "the adapter was made for another base model; merge it into the model it was trained on")
        return name

    per_adapter_modules: list[dict[str, LoraModule]] = []
    for ad in adapters:
        if combining and (ad.config.use_dora or ad.replacements or ad.token_rows):
            what = "DoRA" if ad.config.use_dora else "modules_to_save/trained biases/trainable tokens"
            raise UnsupportedAdapterError(
                f"--combine {options.combine} cannot combine adapter {ad.name}, which uses {what}",
                "use --combine sequential, which applies adapters one after another")
        # PEFT order: full replacements are loaded first, the LoRA parts are merged on top of them
        for param, tensor in ad.replacements.items():
            name = target(ad.name, param, tuple(tensor.shape))
            steps.setdefault(name, []).append(Replace(tensor, ad.name))
        mods: dict[str, LoraModule] = {}
        for path, mod in ad.modules.items():
            name = target(ad.name, f"{path}.weight", mod.delta_shape())
            if mod.rank > min(table[name].shape):
                raise UnsupportedAdapterError(
                    f"adapter {ad.name}: rank {mod.rank} of {path} is larger than the layer {tuple(table[name].shape)}",
                    "a LoRA rank must not exceed the layer's smaller dimension; retrain with a smaller r")
            mods[name] = mod
            if not combining:
                steps.setdefault(name, []).append(AddLora(mod, ad.name))
            if mod.bias is not None:
                bname = target(ad.name, f"{path}.bias", tuple(mod.bias.shape))
                if not combining:
                    steps.setdefault(bname, []).append(AddLoraBias(mod, ad.name))
        per_adapter_modules.append(mods)
        for path, rows in ad.token_rows.items():
            name = _resolve(f"{path}.weight", table)
            if name is None or len(table[name].shape) != 2 or rows.values.shape[1] != table[name].shape[1]:
                raise ShapeMismatchError(
                    f"adapter {ad.name}: trainable tokens of {path} (width {rows.values.shape[1]}) do not fit "
                    f"the base ({'missing' if name is None else tuple(table[name].shape)})",
                    "the adapter was made for another base model")
            if max(rows.indices, default=-1) >= table[name].shape[0] or min(rows.indices, default=0) < 0:
                raise ShapeMismatchError(f"adapter {ad.name}: trainable token index out of range for {name}",
                                         "the adapter was made for another tokenizer/base")
            steps.setdefault(name, []).append(SetRows(rows, ad.name))
            if tied_to and name == tied_to:  # PEFT ties trainable tokens into the tied lm_head
                steps.setdefault("lm_head.weight", []).append(SetRows(rows, ad.name))
        used[ad.name] = len(ad.modules) + len(ad.replacements) + len(ad.token_rows)

    if combining:
        weights = tuple(options.weights or [1.0] * len(adapters))
        names = {n for mods in per_adapter_modules for n in mods}
        for name in names:
            mods = tuple(m.get(name) for m in per_adapter_modules)
            steps.setdefault(name, []).append(
                Combine(options.combine, mods, weights, options.density, options.seed))
            if any(m is not None and m.bias is not None for m in mods):
                bname = _resolve(f"{next(m for m in mods if m is not None).path}.bias", table)
                steps.setdefault(bname, []).append(
                    Combine(options.combine, mods, weights, options.density, options.seed, bias=True))

    notes: list[str] = []
    untied = False
    tie_value: Optional[bool] = None
    if tied_to:
        head, emb = steps.get("lm_head.weight", []), steps.get(tied_to, [])
        if _same_steps(head, emb):
            steps.pop("lm_head.weight", None)
            table.pop("lm_head.weight")
        else:
            untied, tie_value = True, False
            notes.append(f"untied lm_head from {tied_to}: the adapter changes "
                         f"{'both differently' if head and emb else ('only lm_head' if head else 'only ' + tied_to)};"
                         " both are written and tie_word_embeddings is set to false")

    fif = any(a.config.fan_in_fan_out for a in adapters)
    tasks = []
    for name, info in table.items():
        out_dtype = info.dtype
        if options.dtype != "auto" and info.dtype in ("F32", "F16", "BF16", "F64"):
            out_dtype = _TORCH_TO_ST[options.dtype]
        is_linear = (options.qlora_base == "nf4" and len(info.shape) == 2 and name.endswith(".weight")
                     and not name.endswith(_EMBED_SUFFIXES) and name != "lm_head.weight"
                     and not name.endswith("wpe.weight"))
        tasks.append(TensorTask(name, sources[name], info.dtype, out_dtype, tuple(info.shape),
                                tuple(steps.get(name, ())), nf4=is_linear, nf4_transposed=is_linear and fif))
    if tied_to and untied:  # keep lm_head next to the end, as transformers stores it
        tasks.sort(key=lambda t: t.name == "lm_head.weight")
    return MergePlan(tuple(tasks), untied, tie_value, tuple(notes),
                     sum(a.nbytes for a in adapters), used)
