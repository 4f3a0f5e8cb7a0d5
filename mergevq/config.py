"""Load and validate pipeline configs (config/*.yaml) against workflow/schemas/config.schema.yaml.

The Snakefile and every `mergevq` command validate the same resolved object: the YAML file plus
`key.path=value` overrides, nothing inherited from another file.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and key."""


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def parse_overrides(items: Iterable[str]) -> dict:
    """['tokenizer.variants.G.steps=10', ...] -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        set_dotted(out, key, parse_scalar(value))
    return out


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML would type it, and "2e-3" as the number the shell user meant."""
    parsed = yaml.safe_load(text)
    if isinstance(parsed, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
        try:
            parsed = float(parsed) if parsed.strip().lower() not in ("nan", "inf", "-inf", "infinity") else parsed
        except ValueError:
            pass
    return parsed


def _typed_leaves(value: Any) -> Any:
    """Snakemake parses a nested ``--config key={...}`` with YAML's BaseLoader: every leaf is a string."""
    if isinstance(value, dict):
        return {k: _typed_leaves(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed_leaves(v) for v in value]
    return parse_scalar(value) if isinstance(value, str) else value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """tree['a']['b'] = value for key 'a.b' (creating the levels in between)."""
    parts = key.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def deep_update(base: dict, update: dict) -> dict:
    """Return a copy of `base` with `update` merged in recursively (dicts merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate_config(cfg: dict, source: str = "config") -> dict:
    """Schema check plus the checks JSON Schema cannot express. Raises ConfigError naming the key."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            if err.validator == "additionalProperties":
                extra = set(err.instance) - set(err.schema.get("properties", {}))
                msg = f"unknown key(s) {', '.join(sorted(map(str, extra)))}"
            else:
                msg = err.message
            lines.append(f"  {where}: {msg}")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines))
    _semantic_checks(cfg, source)
    return cfg


def _semantic_checks(cfg: dict, source: str) -> None:
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: {key}: {msg}")

    data = cfg["data"]
    if data["dataset"] == "imagefolder" and not data.get("root"):
        fail("data.root", "an ImageFolder dataset needs a root directory")
    if data["dataset"] == "digits" and "val_fraction" not in data:
        fail("data.val_fraction", "the digits dataset needs a validation fraction")
    for name, var in cfg["tokenizer"]["variants"].items():
        key = f"tokenizer.variants.{name}"
        tokens, kept = var["tokens"], var["kept"]
        if not _is_square(tokens):
            fail(f"{key}.tokens", f"{tokens} is not a perfect square (tokens lie on a square grid)")
        if not _is_square(kept):
            fail(f"{key}.kept", f"{kept} is not a perfect square (merged tokens are laid out on a sqrt(K) grid)")
        if kept > tokens:
            fail(f"{key}.kept", f"kept count {kept} exceeds the token count {tokens}")
        for k in var["sweep"]:
            if not _is_square(k) or k > tokens:
                fail(f"{key}.sweep", f"{k} must be a perfect square no larger than tokens={tokens}")
        ms = var["merge_sampling"]
        for bound in ("k_min", "k_max"):
            if not _is_square(ms[bound]) or ms[bound] > tokens:
                fail(f"{key}.merge_sampling.{bound}", f"{ms[bound]} must be a perfect square no larger than tokens={tokens}")
        if ms["k_min"] > ms["k_max"]:
            fail(f"{key}.merge_sampling", f"k_min {ms['k_min']} > k_max {ms['k_max']}")
        need = {"gaussian": ("mu", "sigma"), "exponential": ("lam",), "fixed": ()}[ms["distribution"]]
        for p in need:
            if p not in ms:
                fail(f"{key}.merge_sampling.{p}", f"required by distribution {ms['distribution']!r}")
    if uses_ssl_teacher(cfg) and "ssl_teacher" not in cfg["tokenizer"]:
        fail("tokenizer.ssl_teacher", "loss.teacher 'ssl' needs the teacher's training settings")
    fid = cfg["eval"].get("fid", {})
    if fid.get("extractor") == "demo-classifier" and "demo_classifier" not in cfg["eval"]:
        fail("eval.demo_classifier", "the demo-classifier FID extractor needs its training settings")


def uses_ssl_teacher(cfg: dict, variant: str | None = None) -> bool:
    """Whether `variant` (any variant when None) aligns (Eq. 12) to the SimCLR teacher (`teacher: ssl`)."""
    names = [variant] if variant else list(cfg["tokenizer"]["variants"])
    losses = [variant_config(cfg, v)["loss"] for v in names]
    return any(loss["teacher"] == "ssl" and loss["align"] > 0 for loss in losses)


def load_config(path: str | Path, overrides: Iterable[str] | dict | None = None) -> dict:
    """Read a YAML config, apply overrides, validate, and return the resolved dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    if overrides:
        upd = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        cfg = deep_update(cfg, upd)
    return validate_config(cfg, source=str(path))


def config_hash(cfg: dict) -> str:
    """Stable hash of a resolved config (canonical JSON), used to refuse resuming under another config."""
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def variant_config(cfg: dict, variant: str, kept: int | None = None) -> dict:
    """The settings of one tokenizer variant with the shared `train`/`loss` blocks merged under it.

    kept: Table 4's other protocol ("with the number of kept tokens during training"): the settings
    of a tokenizer trained for this K, i.e. target `kept` = K and the merge-ratio sampler translated
    so that it sits around K as it sat around the variant's own target (`centre_sampler_on`).
    """
    variants = cfg["tokenizer"]["variants"]
    if variant not in variants:
        raise ConfigError(f"tokenizer.variants: no variant {variant!r} (have {sorted(variants)})")
    var = copy.deepcopy(variants[variant])
    var["train"] = deep_update(cfg["tokenizer"]["train"], var.get("train", {}))
    var["loss"] = deep_update(cfg["tokenizer"]["loss"], var.get("loss", {}))
    var["codebook_bits"] = cfg["tokenizer"]["codebook_bits"]
    var["name"] = variant
    var["trained_for_kept"] = None
    if kept is not None:
        key = f"tokenizer.variants.{variant}"
        if not _is_square(kept) or not 0 < kept <= var["tokens"]:
            raise ConfigError(f"{key}: kept count {kept} must be a perfect square in [1, tokens={var['tokens']}]")
        var["merge_sampling"] = centre_sampler_on(var["merge_sampling"], var["kept"], kept, var["tokens"])
        var["kept"] = kept
        var["trained_for_kept"] = kept
    return var


def centre_sampler_on(ms: dict, target: int, kept: int, tokens: int) -> dict:
    """The merge-ratio sampler `ms` (built around `target`) moved to sit around `kept` instead.

    Samplers draw K = (k0 + T)^2, so moving means shifting k0 and the range [k_min, k_max] by the
    same amount in sqrt(K), sqrt(kept) - sqrt(target); the distribution of T (Gaussian or
    exponential, its parameters, the floor) is unchanged. The range is clipped to [1, tokens].
    """
    shift = math.isqrt(kept) - math.isqrt(target)
    side = math.isqrt(tokens)
    out = dict(ms)
    out["k0"] = max(1, ms["k0"] + shift)
    lo = min(max(1, math.isqrt(ms["k_min"]) + shift), side)
    hi = min(max(1, math.isqrt(ms["k_max"]) + shift), side)
    out["k_min"], out["k_max"] = lo * lo, hi * hi
    return out


def save_config(cfg: dict, path: str | Path) -> None:
    from mergevq.files import write_text

    write_text(path, yaml.safe_dump(cfg, sort_keys=False))


def resolved_config_path(cfg: dict, out_dir: str | Path) -> Path:
    """Where a run keeps its resolved config: ``{out_dir}/configs/{config_hash}.yaml``.

    Content-addressed, so a changed config gets a new file and never alters the one that running
    jobs read. Snakemake hands the path to jobs through the ``MERGEVQ_CONFIG`` environment variable
    rather than a rule param: a param (or an f-string in the shell command) holding the hash would
    make every job of the DAG rerun on any config change; the per-rule ``settings`` hash is the
    rerun trigger instead.
    """
    return Path(out_dir) / "configs" / f"{config_hash(cfg)}.yaml"


def write_resolved_config(cfg: dict, path: str | Path) -> Path:
    """Write `cfg` to its content-addressed `path` once (atomically); refuse a differing file there."""
    path = Path(path)
    if path.exists():
        try:
            existing = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: resolved config is not valid YAML ({exc}); move it aside") from exc
        if existing != cfg:
            raise ConfigError(f"{path}: holds another config than its name's hash {path.stem}; "
                              "it was edited by hand: move it aside")
        return path
    save_config(cfg, path)
    return path


def resolve_snakemake_config(configfiles: list, cli_config: dict, default: str | Path) -> tuple[Path, dict]:
    """The one config a Snakemake run uses: exactly one YAML file plus ``--config`` overrides.

    Snakemake deep-merges ``--configfile`` over the Snakefile's own ``configfile:``, so a demo run
    would silently inherit paper keys (ImageNet paths, teacher weights). The Snakefile therefore
    declares no ``configfile:`` and calls this instead: the last ``--configfile`` (or ``default``)
    is read on its own, ``--config`` overrides are deep-merged into it, and the result is validated.
    Snakemake refuses dotted keys (``--config data.root=/x``: "must start with a valid identifier"),
    so a nested setting is given as a mapping: ``--config 'data={"root": "/x"}'``; its leaves arrive
    as strings (YAML BaseLoader) and are typed here as YAML scalars.
    """
    if len(configfiles) > 1:
        raise ConfigError(
            "give one --configfile (got " + ", ".join(map(str, configfiles)) + "); "
            "use --config key.path=value for overrides"
        )
    path = Path(configfiles[0]) if configfiles else Path(default)
    overrides: dict = {}
    for key, value in dict(cli_config).items():  # top-level values are typed by Snakemake already
        set_dotted(overrides, key, _typed_leaves(value) if isinstance(value, (dict, list)) else value)
    return path, load_config(path, overrides)
