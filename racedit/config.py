"""Typed configuration: dataclasses + OmegaConf.

`load_config(path, overrides)` reads a YAML file, merges it onto the dataclass defaults, applies
command-line overrides of the form `a.b=c`, and validates. An unknown key, a value of the wrong type, a
value outside its allowed set or range (`racedit.limits.RANGES`; nan and inf are never allowed) or values
that do not fit together (divisibility, MoE quotas, sampling steps <= T, the data against the batch and the
end-of-run evaluation) raise `ConfigError`: one line naming the key, the value and what is accepted. The
dataclasses below are the config reference: every field carries a comment.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

# the checks between values live in config_checks (below this module); re-exported here, where callers look
from racedit.config_checks import check_batch_layout as check_batch_layout
from racedit.config_checks import check_data, check_distributed, check_losses, check_quota, validate_memory
from racedit.config_checks import check_expert_parallel as check_expert_parallel
from racedit.config_checks import check_moe_shape as check_moe_shape
from racedit.config_checks import check_sample as check_sample
from racedit.config_checks import check_sampling_batch as check_sampling_batch
from racedit.config_checks import log_with_names as log_with_names
from racedit.config_checks import resolved_sizes as resolved_sizes
from racedit.limits import CHOICES, RANGES, ConfigError, in_range, range_error
from racedit.limits import SAMPLERS as SAMPLERS


@dataclass
class ModelConfig:
    """Architecture. Fields left at None take the value of the preset named by `name`."""

    name: str = "DiT-S/2"  # preset: DiT-{S,B,M,L,XL}/{2,4,8} or RaceDiT-{S,B,M,L,XL}/{2,4,8}-{k}in{E}
    input_size: int = 32  # spatial size of the model input (latent side, or pixel side for digits)
    in_channels: int = 4  # channels of the model input
    num_classes: int = 1000  # class labels; the null (unconditional) class is num_classes
    learn_sigma: bool = True  # predict the variance too (DDPM hybrid loss); doubles the output channels
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    depth: int | None = None  # number of DiT blocks (preset)
    hidden_size: int | None = None  # width D (preset)
    num_heads: int | None = None  # attention heads (preset)
    patch_size: int | None = None  # patch side p (preset)
    mlp_ratio: float = 4.0  # dense MLP hidden = mlp_ratio * D
    # sinusoidal timestep frequencies exp(-ln(10000) i / (128 - shift)), i < 128: 0 = DiT's; 1 = diffusers'
    # DiTTransformer2DModel (its Timesteps(downscale_freq_shift=1)); `racedit convert from-diffusers` sets 1
    timestep_freq_shift: float = 0.0
    qk_norm: bool = False  # LayerNorm on queries and keys (stabilises long mixed-precision runs)
    # --- Mixture of Experts (racedit.models.moe); moe_experts = 0 keeps the dense MLP
    moe_experts: int | None = None  # E candidate experts per layer (preset "kinE"); 0 = dense
    moe_k: int | None = None  # k active experts per token on average; expert hidden = mlp_ratio * D / k
    routing: str = "expert_race"  # token_choice | expert_choice | bl_choice | be_choice | le_choice | expert_race
    gating: str = "identity"  # identity | sigmoid | softmax, applied to the gating-head logits
    race_scope: str = "local"  # local: top-K over this process's batch; global: over all ranks' scores
    # race_scope=global: radix (histogram all_reduces, a few KiB per layer at any world size) | gather (the scores)
    global_select: str = "radix"
    # expert parallelism: the experts of every MoE layer split over this many processes (E/n each; 1 = off).
    # How the model runs, not what it is: checkpoints hold all E experts, a run may resume with another n
    expert_parallel: int = 1
    threshold_decay: float = 0.99  # EMA decay of the inference threshold (batch K-th largest score)
    inference_routing: str = "threshold"  # eval mode: threshold (S >= tau, batch-independent) | topk (training rule)
    router_target_head: bool = True  # router head predicting the diffusion target (per-layer regularization)
    # --- Residual stream (racedit.models.connections)
    connections: str = "residual"  # residual | hyper | frac
    connections_n: int = 2  # hyper-connections: number of residual streams
    connections_m: int = 2  # frac-connections: number of fractions of the stream
    connections_dynamic: bool = False  # dynamic (input-dependent) connection weights
    connections_tanh: bool = True  # tanh on the dynamic projections
    # --- Memory layers (racedit.models.memory), parallel to the feed-forward
    memory: str = "none"  # none | pkm | ultramem | ultramemv2
    memory_blocks: list[int] = field(default_factory=list)  # block indices with a memory layer; empty = every block
    memory_keys: int = 128  # n: keys per side of the product-key grid; S = n*n value slots per memory layer
    memory_topk: int = 32  # m: slots each query head reads per token (TopM)
    memory_heads: int = 1  # query heads (own queries and keys) reading one shared table; their reads are summed
    memory_key_dim: int = 0  # Dk; 0 = D/2 (pkm, ultramem) or, for ultramemv2, the Dk that gives memory_share
    memory_value_dim: int = 0  # Dv (ultramem, ultramemv2); 0 = D/2 (ultramem) or 3D/16 (ultramemv2); pkm values are D wide
    memory_prevalue_dim: int = 0  # Dp, ultramemv2 pre-value width; 0 = D/16 (Dp:Dv = 1:3, the paper's 72:216 at D=1152)
    memory_rank: int = 2  # r: Tucker rank of the query-key retrieval (ultramem, ultramemv2)
    memory_cores: int = 2  # h: scoring cores, core i weighting the i-th Dv/h columns of each value (ultramem, ultramemv2)
    memory_expansion: int = 0  # E: implicit value expansion, a square (1, 4, 9, 16); 0 = 4 (ultramem) or 1 (ultramemv2)
    memory_share: float = 0.17  # ultramemv2 with memory_key_dim=0: memory MACs / (block + memory) MACs per token
    # Tucker pre-filter: also keep the m lowest rank-1 row/column scores (exact for a rank-1 core whatever the
    # signs, 4x the candidates); false = the paper's top-m rows and columns only
    memory_prefilter_signed: bool = False
    memory_value_std: float = 0.0  # std of the value/pre-value tables; 0 = the kind's init (racedit/models/memory.py)
    memory_value_lr_scale: float = 1.0  # LR multiplier of the value/pre-value tables (UltraMem: 4 to 10 with decay; V2: 1)
    memory_value_lr_decay: float = 0.0  # fraction of train.steps over which that multiplier decays linearly to 1; 0 = constant


@dataclass
class DiffusionConfig:
    """Training objective and its noise schedule."""

    objective: str = "ddpm"  # ddpm (epsilon prediction, linear betas) | flow (rectified flow, velocity)
    num_timesteps: int = 1000  # DDPM T
    beta_start: float = 1e-4  # DDPM linear schedule start
    beta_end: float = 0.02  # DDPM linear schedule end
    flow_t_sampling: str = "uniform"  # flow: uniform | logit_normal
    flow_logit_mean: float = 0.0  # flow logit-normal location
    flow_logit_std: float = 1.0  # flow logit-normal scale


@dataclass
class LossConfig:
    """Coefficients of the auxiliary losses (0 = off). The Race-DiT paper does not publish its values."""

    router_similarity: float = 0.0  # router similarity loss (Race-DiT section 5)
    per_layer_reg: float = 0.0  # per-layer regularization: router target head regresses the diffusion target
    balance: float = 0.0  # Switch-style load-balance loss
    z_loss: float = 0.0  # ST-MoE router z-loss


@dataclass
class DataConfig:
    """Where training images or latents come from."""

    kind: str = "digits"  # digits (embedded scikit-learn digits, pixel space) | latents (extracted VAE latents)
    image_size: int = 8  # digits: side after the optional resize (8 = native)
    latents: str = ""  # latents: directory written by `racedit extract-latents`
    sample_posterior: bool = True  # latents: draw from the stored posterior (False: use its mean)
    flip: bool = True  # latents: random horizontal flip (one of the two stored flips, drawn per sample)
    vae: str = ""  # latents: VAE hub id or local dir for decoding; empty = the one named in the manifest
    num_workers: int = 0  # DataLoader workers
    holdout_fraction: float = 0.1  # digits: fraction held out for evaluation (fixed, seeded split)


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    out_dir: str = "runs/default"  # run directory: checkpoints/, metrics.csv, tensorboard/, samples/
    steps: int = 1000  # optimizer steps
    global_batch: int = 64  # images per optimizer step, summed over processes and accumulation
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay (only on weight matrices)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    warmup_steps: int = 0  # linear warm-up steps
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    ema_decay: float = 0.9999  # EMA of weights, updated every optimizer step
    mixed_precision: str = "no"  # no | bf16 | fp16
    grad_checkpointing: bool = False  # recompute each block in backward to save activation memory
    compile: bool = False  # torch.compile the model as one graph (racedit.models.compiling)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    # ddp: every process holds the whole model (DistributedDataParallel); fsdp: parameters, gradients, AdamW
    # state and the EMA sharded over the processes (FSDP2), checkpoints written per process (racedit.training.sharding)
    distributed: str = "ddp"
    seed: int = 0  # global seed (data order, noise, init)
    log_every: int = 50  # steps between metric rows (metrics.csv and the train.log_with trackers)
    # experiment trackers fed through accelerate besides metrics.csv: one of accelerate's tracker names
    # (tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive, swanlab, ...), several as a list or
    # comma-separated, or none (or empty) for metrics.csv only. TensorBoard writes to <out_dir>/tensorboard/;
    # the others take the run directory's name as their project name
    log_with: Any = "tensorboard"
    # steps between routing diagnostics (racedit.models.routing_stats: MaxVio, combination usage, experts per
    # token per timestep bin, zero-expert tokens, block output norms), logged in that step's metrics row;
    # 0 = with every metrics row (train.log_every), -1 = off
    diagnostics_every: int = 0
    ckpt_every: int = 500  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept on disk besides `last`
    sample_every: int = 0  # steps between sample grids (0 = only at the end)
    max_nonfinite: int = 10  # consecutive non-finite losses/gradients before the run stops
    eval_samples_per_class: int = 0  # digits: samples per class for the end-of-run accuracy (0 = off)
    num_threads: int = 0  # torch intra-op CPU threads (0 = torch's default); 1 is fastest for tiny models
    init_from: str = ""  # start a new run from this checkpoint's EMA weights (fine-tune converted/upcycled models)


@dataclass
class SampleConfig:
    """Defaults for sampling (sample grids during training, and `racedit sample`)."""

    sampler: str = "ddpm"  # ddpm | ddim | dpm_solver (ddpm objective); euler | heun (flow objective)
    steps: int = 250  # sampling steps
    cfg_scale: float = 4.0  # classifier-free guidance scale; 1 = no guidance
    guidance_channels: int = 0  # channels guided: 0 = all; 3 reproduces DiT's 3-of-4 legacy behaviour


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _allowed_keys(node: Any) -> list[str]:
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def _schema_at(path: str) -> Any:
    node: Any = Config
    for part in [p for p in path.split(".") if p]:
        names = {f.name: f for f in fields(node)}
        if part not in names:
            return None
        f = names[part]
        node = f.default_factory() if f.default_factory is not MISSING else f.default  # dataclasses.MISSING
        if not is_dataclass(node):
            return node if part == path.split(".")[-1] else None
    return node


def _field_type(path: str) -> str | None:
    """The declared type of the config field at dotted `path` (e.g. 'int', 'list[float]'), or None."""
    parent, _, name = path.rpartition(".")
    node = _schema_at(parent)
    if not is_dataclass(node):
        return None
    for f in fields(node):
        if f.name == name:
            return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return None


def _explain(err: OmegaConfBaseException, where: str, key: str = "") -> ConfigError:
    """One sentence naming the key, the value and what is accepted (none of OmegaConf's multi-line detail)."""
    key = getattr(err, "full_key", None) or key
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _allowed_keys(_schema_at(parent))
        return ConfigError(f"{where}: unknown key '{key}'. Allowed keys under '{parent or '<root>'}': {allowed}")
    if isinstance(err, ValidationError) and key:
        expected = _field_type(key)
        if expected is None and is_dataclass(_schema_at(key)):
            expected = f"a section (a mapping of keys {_allowed_keys(_schema_at(key))})"
        value = getattr(err, "value", None)
        return ConfigError(f"{where}: bad value for '{key}': {value!r} is not of type {expected or 'the declared type'}")
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ConfigError(f"{where}: {first_line}")


def _check_sections(tree: Any, node: Any, prefix: str, where: str) -> None:
    """Raise ConfigError if a config section (e.g. `train:`) is given a scalar or a list instead of keys."""
    if not is_dataclass(node):
        return
    if not isinstance(tree, dict):
        what = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(f"{where}: {what} must be a mapping of keys {_allowed_keys(node)}, got {tree!r}")
    for name, value in tree.items():
        child = _schema_at(f"{prefix}.{name}" if prefix else str(name))
        if is_dataclass(child):
            _check_sections(value, child, f"{prefix}.{name}" if prefix else str(name), where)


def validate(cfg: DictConfig | Config) -> None:
    """Check every value against its allowed set or range and the constraints between values (one process; the
    training loop checks the batch layout again with its process count); raise ConfigError naming the key."""
    for section in ("diffusion", "loss", "data", "train", "sample"):  # the model's: in check_model_shape
        _check_ranges(getattr(cfg, section), section)
    betas = list(cfg.train.betas)
    if len(betas) != 2 or not all(in_range(b, "[0, 1)") for b in betas):
        raise ConfigError(f"bad value for 'train.betas': {betas}. Must be two finite numbers in [0, 1) "
                          "([beta1, beta2], e.g. [0.9, 0.999])")
    if not all(in_range(b, ">= 0") for b in cfg.model.memory_blocks):
        raise ConfigError(f"bad value for 'model.memory_blocks': {list(cfg.model.memory_blocks)}. Must be block "
                          "indices >= 0 (empty = every block)")
    for path, allowed in CHOICES.items():
        value = _get(cfg, path)
        if value not in allowed:
            raise ConfigError(f"bad value for '{path}': {value!r}. Allowed: {list(allowed)}")
    log_with_names(cfg.train.log_with)
    check_model_shape(cfg.model)
    validate_memory(cfg.model)
    check_sample(cfg)
    d, tc = cfg.diffusion, cfg.train
    if d.beta_start > d.beta_end:
        raise ConfigError(f"bad values for 'diffusion.beta_start' and 'diffusion.beta_end': {d.beta_start} > "
                          f"{d.beta_end}. Need 0 < beta_start <= beta_end < 1")
    if not str(tc.out_dir).strip():
        raise ConfigError("bad value for 'train.out_dir': ''. Must name the run directory")
    check_losses(cfg)
    check_distributed(cfg)
    check_batch_layout(cfg)
    check_data(cfg)


def _check_ranges(node: Any, section: str) -> None:
    """Every number of config section `section` (e.g. cfg.train) inside its `RANGES` entry."""
    for path, spec in RANGES.items():
        if path.startswith(f"{section}."):
            value, declared = getattr(node, path.split(".", 1)[1]), _field_type(path) or ""
            if not (value is None and "None" in declared) and not in_range(value, spec):
                raise range_error(path, value, spec, is_float="float" in declared)



def check_model_shape(model: Any) -> None:
    """Raise ConfigError unless a model's numbers are in their `RANGES` and its sizes fit together (preset
    values where fields are None): the k-in-E shape (`check_moe_shape`), heads dividing the width, a width
    the 2-D sin-cos position embedding takes (a multiple of 4), patches tiling the input, frac-connections'
    fractions dividing the width, a feed-forward (or expert) hidden width >= 1, and a whole number of pairs
    per routing group for the strategies whose quota does not depend on the batch (expert choice). The
    boundary check for configs (`validate`) and for models built in code (`racedit.models.resolve_model_config`)."""
    _check_ranges(model, "model")
    size = resolved_sizes(model)
    D, heads, p = size["hidden_size"], size["num_heads"], size["patch_size"]
    if D % heads:
        raise ConfigError(f"model.hidden_size={D} is not divisible by model.num_heads={heads}")
    if D % 4:
        raise ConfigError(f"bad value for 'model.hidden_size': {D}. Must be a multiple of 4 (the 2-D sin-cos "
                          "position embedding gives a quarter of the width to each of sin/cos x rows/columns)")
    if model.input_size % p:
        raise ConfigError(f"model.input_size={model.input_size} is not divisible by model.patch_size={p}")
    if model.connections == "frac" and D % model.connections_m:
        raise ConfigError(f"model.connections_m={model.connections_m} must divide model.hidden_size={D} "
                          "(frac-connections cut the width into that many fractions)")
    check_moe_shape(model)
    k, experts = size["moe_k"], size["moe_experts"]
    hidden = round(model.mlp_ratio * D / k) if experts else int(D * model.mlp_ratio)
    if hidden < 1:
        raise ConfigError(f"bad value for 'model.mlp_ratio': {model.mlp_ratio}. The feed-forward hidden width "
                          f"{'mlp_ratio * D / k' if experts else 'mlp_ratio * D'} rounds to {hidden}; must be >= 1")
    if experts and model.routing != "bl_choice":  # the one quota that depends on the batch: check_batch_layout
        check_quota(model, 1, "")

def _get(obj: Any, path: str) -> Any:
    if isinstance(obj, DictConfig):
        return OmegaConf.select(obj, path)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def parse_override(item: str) -> tuple[str, Any]:
    """An `a.b=c` override -> (dotted key, value), the value parsed as YAML by OmegaConf (as on the command line)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
    key = item.split("=", 1)[0]  # as OmegaConf reads it: a stray space stays part of the (unknown) key
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as e:
        raise _explain(e, f"override {item!r}", key) from None
    for part in key.split("."):
        value = value[part]
    return key, value


def read_config_text(path: str | Path) -> str:
    """The text of config file `path`; ConfigError if it is missing, a directory or not UTF-8 text. An OSError
    while reading (permission denied, an I/O error) propagates with the path: racedit.cli reports it."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a YAML file (e.g. configs/demo.yaml)")
    if not p.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a YAML config: byte {e.start} is not UTF-8 text (a binary file?)") from None


def yaml_error_text(e: yaml.YAMLError, where: str, text: str | None = None) -> str:
    """A PyYAML error as one line: `where:LINE:COLUMN: problem (context that starts at L:C)`, counted from 1 as an
    editor does. `text`, if given, lets a tab that YAML refuses be named as one."""
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML refuses: only its offset is known
        line = (text or "").count("\n", 0, e.position) + 1
        column = e.position - (text or "").rfind("\n", 0, e.position)
        code = e.character if isinstance(e.character, int) else ord(e.character)
        return f"{where}:{line}:{column}: {e.reason} (character U+{code:04X})"
    if not isinstance(e, yaml.MarkedYAMLError) or mark is None:
        return f"{where}: not valid YAML: {' '.join(str(e).split())}"
    problem = e.problem or "not valid YAML"
    if text is not None and text[mark.index:mark.index + 1] == "\t":
        problem += " (a tab: YAML indents with spaces)"
    context = ""
    if e.context:
        cm = e.context_mark
        elsewhere = cm is not None and (cm.line, cm.column) != (mark.line, mark.column)
        context = f" ({e.context}{f' that starts at {cm.line + 1}:{cm.column + 1}' if elsewhere else ''})"
    return f"{where}:{mark.line + 1}:{mark.column + 1}: {problem}{context}"


def parse_yaml_config(text: str, where: str) -> DictConfig:
    """A config file's YAML text -> DictConfig; ConfigError (one line, with line and column) if it is not
    YAML, is empty, or is not a mapping of sections."""
    try:
        # syntax, and what the top level is, without building it; libyaml, as OmegaConf, for its clearer messages
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if node is None:
            what = "is empty" if not text.strip() else "holds no settings (only comments)"
            raise ConfigError(f"{where} {what}: a config is a mapping of sections {_allowed_keys(Config)}")
        if not isinstance(node, yaml.MappingNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else f"the value {node.value!r}"
            raise ConfigError(f"{where}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: the top level is "
                              f"{kind}; a config is a mapping of sections {_allowed_keys(Config)}")
        loaded = OmegaConf.create(text)  # OmegaConf's loader: its float rules; refuses duplicate keys
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_text(e, where, text)) from None
    return loaded


def load_config(path: str | Path | None = None, overrides: Iterable[str | tuple[str, Any]] | None = None) -> Config:
    """Load YAML onto the defaults, apply the overrides in order, validate, and return a typed `Config`.

    An override is an `a.b=c` string (`parse_override`) or a (dotted key, value) pair whose value is set as
    it is, with OmegaConf.update (the ablation grid's typed overrides)."""
    schema = OmegaConf.structured(Config)
    if path is not None:
        where = str(path)
        loaded = parse_yaml_config(read_config_text(path), where)
        _check_sections(OmegaConf.to_container(loaded), Config, "", where)
        try:
            schema = OmegaConf.merge(schema, loaded)
        except OmegaConfBaseException as e:
            raise _explain(e, where) from None
    for item in overrides or []:
        key, value = parse_override(item) if isinstance(item, str) else item
        where = f"override {item!r}" if isinstance(item, str) else f"override {key}={value!r}"
        tree = value
        for part in reversed(key.split(".")):
            tree = {part: tree}
        _check_sections(tree, Config, "", where)
        try:
            OmegaConf.update(schema, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise _explain(e, where, key) from None
    validate(schema)
    return OmegaConf.to_object(schema)


ABSENT = type("Absent", (), {"__repr__": lambda self: "(absent)"})()  # a key one side of a diff lacks


def flatten_config(cfg: Any) -> dict[str, Any]:
    """Dotted key -> leaf value of a config: a dataclass (e.g. `Config`), an OmegaConf container or a plain
    mapping (e.g. parsed YAML). Lists are leaves."""
    if is_dataclass(cfg) or isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(OmegaConf.structured(cfg) if is_dataclass(cfg) else cfg)
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flatten_config(value).items()})
        else:
            out[str(key)] = value
    return out


def config_diff(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (value in a, value in b) for every leaf where two configs differ, sorted by key; a key
    only one side has is paired with `ABSENT`. a, b: anything `flatten_config` takes."""
    fa, fb = flatten_config(a), flatten_config(b)
    pairs = {k: (fa.get(k, ABSENT), fb.get(k, ABSENT)) for k in sorted(fa.keys() | fb.keys())}
    return {k: (x, y) for k, (x, y) in pairs.items() if x is ABSENT or y is ABSENT or x != y}


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written beside every checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str, where: str = "saved config") -> Config:
    """Parse a config saved by `to_yaml`, validating it like a user file; `where` names it in errors."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), parse_yaml_config(text, where))
    except OmegaConfBaseException as e:
        raise _explain(e, where) from None
    validate(merged)
    return OmegaConf.to_object(merged)
