"""The deployment file (`switchyard.toml`), parsed once into frozen pydantic models.

Relative paths in the file are relative to the file's own folder, so a deployment folder can be
moved as a whole. Example:

    [base]
    model = "base"                 # a Hugging Face checkpoint folder
    name = "demo-base"             # the stable name clients call for the base model

    [engine]
    max_lora_rank = 8
    max_loras = 4
    max_model_len = 512
    kv_cache_gib = 1               # VLLM_CPU_KVCACHE_SPACE on CPU
    extra_args = []                # passed through to vLLM's api_server

    [gateway]
    host = "127.0.0.1"
    port = 8000
    adapters_root = "adapters"     # admin loads must resolve under here
    state_dir = "state"            # registry, merged artifacts, logs

    [gates]                        # a promote is refused unless the candidate is within both
    max_accuracy_drop = 0.05
    max_kl = 0.1

    [deploy]
    keep_adapter_loaded = true
    quantize = "auto"              # awq | none | auto (awq where this vLLM can serve 4-bit)

    [[adapters]]
    name = "reverse-bot"           # stable name
    path = "adapters/reverse"
    eval = "eval/reverse.jsonl"
    calibration = "train/reverse.jsonl"
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from switchyard.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseModelSpec(_Frozen):
    model: Path
    name: str = "base"


class EngineSpec(_Frozen):
    max_lora_rank: int = Field(16, ge=1, le=512)
    max_loras: int = Field(4, ge=1)
    max_model_len: int = Field(1024, ge=16)
    kv_cache_gib: int = Field(1, ge=1)  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
    dtype: str = "auto"
    start_timeout_s: float = Field(300.0, gt=0)
    extra_args: tuple[str, ...] = ()


class GatewaySpec(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    adapters_root: Path | None = None
    state_dir: Path = Path("state")
    # keys may also come from SWITCHYARD_API_KEYS / SWITCHYARD_ADMIN_KEY (the environment wins);
    # without any admin key, `serve` makes one and keeps it in <state_dir>/admin.key (mode 0600)
    api_keys: tuple[SecretStr, ...] = ()
    admin_key: SecretStr | None = None


class DeploySpec(_Frozen):
    keep_adapter_loaded: bool = True   # rollback then needs no load: it is a route switch
    # awq: merge, then AWQ W4A16; none: serve the merged checkpoint in full precision;
    # auto: awq where the local vLLM has 4-bit kernels (a CUDA GPU, an AVX-512 CPU), else none
    quantize: str = Field("auto", pattern="^(awq|none|auto)$")
    drain_timeout_s: float = Field(30.0, ge=0)
    warmup_requests: int = Field(3, ge=0)
    validate_max_prompts: int = Field(48, ge=1)   # eval items the promote gate runs
    calibration_samples: int = Field(32, ge=1)    # AWQ calibration prompts (from the adapter's eval set)
    calibration_seq_len: int = Field(256, ge=16)
    awq_grid_points: int = Field(10, ge=2)        # AWQ's scale search; 20 is llm-compressor's default


class Gates(_Frozen):
    max_accuracy_drop: float = Field(0.05, ge=0)
    max_kl: float = Field(0.1, ge=0)


class AdapterSpec(_Frozen):
    name: str
    path: Path
    eval: Path | None = None
    calibration: Path | None = None  # AWQ calibration prompts (e.g. its training prompts); default: eval


class DeploymentConfig(_Frozen):
    source: Path | None = None
    base: BaseModelSpec
    engine: EngineSpec = EngineSpec()
    gateway: GatewaySpec = GatewaySpec()
    gates: Gates = Gates()
    deploy: DeploySpec = DeploySpec()
    adapters: tuple[AdapterSpec, ...] = ()

    @model_validator(mode="after")
    def _names_unique(self) -> "DeploymentConfig":
        names = [self.base.name, *(a.name for a in self.adapters)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique, repeated: {', '.join(dupes)}")
        return self

    def adapter(self, name: str) -> AdapterSpec:
        for a in self.adapters:
            if a.name == name:
                return a
        known = ", ".join(a.name for a in self.adapters) or "none"
        raise ConfigError(f"no adapter named {name!r} in {self.source}", f"known adapters: {known}")


def _resolve_paths(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    def rel(p: Any) -> Any:
        return str((root / p).resolve()) if isinstance(p, str) else p

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    if isinstance(raw.get("base"), dict) and "model" in raw["base"]:
        raw["base"]["model"] = rel(raw["base"]["model"])
    gw = raw.get("gateway")
    if isinstance(gw, dict):
        for key in ("adapters_root", "state_dir"):
            if key in gw:
                gw[key] = rel(gw[key])
    else:
        raw["gateway"] = {}
    raw["gateway"].setdefault("state_dir", rel("state"))
    adapters = []
    for a in raw.get("adapters", []) or []:
        a = dict(a) if isinstance(a, dict) else a
        if isinstance(a, dict):
            for key in ("path", "eval", "calibration"):
                if key in a:
                    a[key] = rel(a[key])
        adapters.append(a)
    raw["adapters"] = adapters
    return raw


def parse_config(text: str, *, source: Path) -> DeploymentConfig:
    """Parse TOML text; `source` is the file it came from (paths resolve against its folder)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}", "fix the syntax at that line") from None
    raw = _resolve_paths(raw, source.parent)
    try:
        return DeploymentConfig(source=source, **raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = f", got {err['input']!r}" if err.get("type") != "missing" else ""
        raise ConfigError(
            f"{source}: key {key!r}: {err['msg']}{got}",
            "see the example at the top of switchyard/config.py",
        ) from None


def load_config(path: Path | str) -> DeploymentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist",
            "pass --config PATH to a switchyard.toml (make demo writes artifacts/demo/switchyard.toml)",
        )
    return parse_config(path.read_text(), source=path.resolve())
