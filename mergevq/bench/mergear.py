"""Item 3: MergeAR decoding with the pruned KV cache against the full cache (same weights, the
Eq. (16) mask in both), teacher-forced on real code sequences.

Real code sequences: digits upsampled to 256 px go through a G tokenizer (L = 1024 -> K = 256);
x_l = the code of position l's owner (`indices.gather(1, owner)`), so every merged group repeats
its code over the positions it covers and the duplicates are those merging makes (an untrained
generator would emit almost none). The tokenizer's weights are random: the duplicate STRUCTURE
comes from ToMe merging the image's tokens (a digit's flat background merges first), which random
weights already do; on CPU its CNN stages are narrowed (only the merged tokens matter).
Both sides decode all L tokens with `force=` those codes, so they do exactly the same steps, and
they run in lockstep (`mergevq.bench.timing.lockstep`): pruned step t, full step t, pruned step
t + 1, ..., so one decode of each yields L paired step times; the speed-up is the ratio of the
totals with a 95% paired bootstrap interval over steps. (A decode of the CPU model is minutes
long: alternating whole decodes would need several per side to see past the machine's drift.)

FLOP model (`decode_flops`): the FLOPs torch.utils.flop_counter counts for a decode (every matrix
product: linear layers, attention, the factorised head), from the config and the number of keys
each step attends over. Its predicted speed-up is FLOPs(full) / FLOPs(pruned) of the same run;
the tests check it against flop_counter on a small decode.
"""
from __future__ import annotations

import statistics

import torch

from mergevq.bench.report import Goal, ItemResult
from mergevq.bench.scale import BenchScale
from mergevq.bench.timing import lockstep, paired_ratio, profile_top, time_call
from mergevq.bench.tome import digit_images
from mergevq.generator import GPTConfig, build_generator
from mergevq.generator.codes import owner_from_source, position_indices
from mergevq.generator.mergear import PREFIX_LEN, MergeARStats, keep_by_code, keep_rule_disagreement
from mergevq.tokenizer import build_tokenizer

# ---------------------------------------------------------------------------------------------
# FLOP model


def block_flops(config: GPTConfig, rows: int, queries: int, keys: int) -> int:
    """flop_counter FLOPs of one transformer block: `queries` tokens per row, attending over `keys`
    keys (masked keys cost the same as visible ones). Linear: qkv (3 d^2), output (d^2), SwiGLU
    (3 d h) per token; attention: q.k and p.v, 2 x 2 d FLOPs per (query, key) pair."""
    d, h = config.dim, config.ffn_hidden
    return 2 * rows * queries * (4 * d * d + 3 * d * h) + 4 * rows * queries * keys * d


def decode_flops(config: GPTConfig, rows: int, keys_per_step) -> int:
    """FLOPs of a MergeAR/LlamaGen-style decode of config.num_tokens codes for `rows` rows.

    keys_per_step: keys attended over by the single query of steps 1 .. L-1 (step 0 is the prefill
    of the P = 2 prefix tokens). Every step also decodes one code with the factorised head: for
    sub-token i the intra blocks run over i + 1 slots (causal, counted in full) and head i maps
    one slot to 2^b_i logits.
    """
    n, d = config.num_tokens, config.dim
    keys = list(keys_per_step)
    if len(keys) != n - 1:
        raise ValueError(f"keys_per_step has {len(keys)} entries, a decode of {n} tokens has {n - 1} cached steps")
    backbone = config.n_layer * (block_flops(config, rows, PREFIX_LEN, PREFIX_LEN)
                                 + sum(block_flops(config, rows, 1, k) for k in keys))
    head = sum(config.n_intra_layer * block_flops(config, rows, i + 1, i + 1) + 2 * rows * d * 2**b
               for i, b in enumerate(config.bits_split))
    return backbone + n * head


def keys_per_step(stats: MergeARStats, pruned: bool) -> list[int]:
    """Keys the query of each cached step 1 .. L-1 reads. Full cache: P + t at step t. Pruned cache:
    the batch's highest occupied slot + 1, i.e. max over rows of (P + tokens kept before) + 1
    (rows share one buffer length; a row's invalid slots are masked, not skipped)."""
    steps = stats.cache_len.shape[1]  # L - 1
    if not pruned:
        return [PREFIX_LEN + t for t in range(1, steps + 1)]
    before = torch.cat([torch.full_like(stats.cache_len[:, :1], PREFIX_LEN), stats.cache_len[:, :-1]], dim=1)
    return [int(v) + 1 for v in before.max(0).values]


def kv_cache_bytes(config: GPTConfig, rows: int, slots: int, dtype: torch.dtype) -> int:
    """Bytes of a KVCache: keys and values of every layer, (rows, heads, slots, head_dim) each."""
    return 2 * config.n_layer * rows * slots * config.dim * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Real code sequences


class CodeSequences:
    def __init__(self, variant: str, overrides: dict, batch: int, device: torch.device):
        torch.manual_seed(0)
        tokenizer = build_tokenizer(variant, dinov2_init=False, **overrides).to(device).eval()
        self.kept, self.tokens, self.bits = tokenizer.config.kept, tokenizer.num_tokens, tokenizer.config.bits
        images, self.labels = digit_images(batch, tokenizer.resolution, device)
        with torch.no_grad():
            encoded = tokenizer.encoder(images, self.kept)
            indices = tokenizer.quantizer(encoded.z).indices  # (B, K)
        self.owner = owner_from_source(encoded.source)  # (B, L)
        self.codes = position_indices(indices, self.owner)  # (B, L): x_l = code of l's owner
        self.tokenizer = f"{variant} {overrides or ''}".strip()

    def describe(self) -> dict:
        new = keep_by_code(self.codes).sum(1).float()  # distinct codes per sequence
        return {"tokenizer": self.tokenizer, "weights": "random (duplicate structure from ToMe merging)",
                "L": self.tokens, "K": self.kept, "bits": self.bits,
                "distinct_codes": {"mean": float(new.mean()), "min": int(new.min()), "max": int(new.max())},
                "duplicate_share": float(1 - new.mean() / self.tokens),
                "code_vs_owner_rule_disagreement": float(keep_rule_disagreement(self.codes, self.owner).mean())}


# ---------------------------------------------------------------------------------------------
# The item


def build_model(preset: str, overrides: dict, device: torch.device):
    torch.manual_seed(0)
    model = build_generator(preset, **overrides).to(device).eval()
    return model.to(torch.bfloat16) if device.type == "cuda" else model


def run(scale: BenchScale, device: torch.device) -> ItemResult:
    cpu = device.type == "cpu"
    seq = CodeSequences(scale.codes_tokenizer, scale.codes_tokenizer_cpu_overrides if cpu else {},
                        scale.mergear_batch, device)
    preset, overrides = scale.mergear_cpu if cpu else scale.mergear_cuda
    overrides = {"codebook_bits": seq.bits, **overrides}
    model = build_model(preset, overrides, device)
    config = model.config
    if config.num_tokens != seq.tokens:
        raise ValueError(f"bench: generator {preset} {overrides} decodes {config.num_tokens} tokens but the "
                         f"codes have L = {seq.tokens}")
    b, n, k = scale.mergear_batch, seq.tokens, seq.kept
    labels, codes = seq.labels, seq.codes

    def decode(prune: bool, mdl=model, lab=labels, cod=codes, kept=k):
        return lambda: mdl.generate_with_stats(lab, kept=kept, force=cod, prune_cache=prune)

    # warm-up: the same widths on a small grid (kernels, allocator), so no full decode is spent on it
    small = build_model(preset, {**overrides, "grid": scale.mergear_warmup_grid}, device)
    m = small.config.num_tokens
    small_codes = codes[:, :m]
    small_kept = int(keep_by_code(small_codes).sum(1).max())
    for prune in (True, False):
        time_call(decode(prune, small, labels, small_codes, small_kept), device)
    del small

    segments, outs = lockstep({"pruned": decode(True), "full": decode(False)}, model.layers[0], device)
    pruned, full = outs["pruned"], outs["full"]
    if not (torch.equal(pruned.codes, codes) and torch.equal(full.codes, codes)):
        raise RuntimeError("bench: a forced MergeAR decode returned other codes than it was forced to")
    total = {side: sum(seg) for side, seg in segments.items()}

    dtype = next(model.parameters()).dtype
    kv = {"pruned": kv_cache_bytes(config, b, pruned.stats.capacity, dtype),
          "full": kv_cache_bytes(config, b, full.stats.capacity, dtype)}
    flops = {"pruned": decode_flops(config, b, keys_per_step(pruned.stats, True)),
             "full": decode_flops(config, b, keys_per_step(full.stats, False))}
    paired = paired_ratio(segments["full"], segments["pruned"])
    speedup = paired.value
    quarters = torch.arange(len(segments["full"])).tensor_split(4)
    by_quarter = [sum(segments["full"][i] for i in q.tolist()) / sum(segments["pruned"][i] for i in q.tolist())
                  for q in quarters]
    model_speedup = flops["full"] / flops["pruned"]
    kv_ratio = kv["pruned"] / kv["full"]
    ideal_kv = (k + PREFIX_LEN) / (n + PREFIX_LEN)

    keys = {"mergear_speedup": speedup, "mergear_kv_ratio": kv_ratio,
            "mergear_flop_model_speedup": model_speedup}
    # The pruned buffer holds P + K entries plus one working slot, the full one P + L - 1 (the last
    # token is never an input): 2% above (K + 2) / (L + 2) covers that slot.
    goals = [Goal("mergear_kv_ratio", kv_ratio, "<=", 1.02 * ideal_kv,
                  f"pruned / full KV-cache bytes; (K + 2) / (L + 2) = {ideal_kv:.4f}, +2% for the working slot")]
    if cpu:
        goals.append(Goal("mergear_speedup", speedup, ">=", 0.9 * model_speedup,
                          f"measured time ratio full / pruned vs 90% of the FLOP model's {model_speedup:.3f}"))
    else:
        goals.append(Goal("mergear_speedup", speedup, ">=", 1.5, "measured time ratio full / pruned (GPU goal)"))
    details = {
        "generator": {"preset": preset, **overrides, "n_intra_layer": config.n_intra_layer,
                      "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype)},
        "batch": b, "codes": seq.describe(),
        "kept_per_row": {"mean": float(pruned.stats.kept.float().mean()), "max": int(pruned.stats.kept.max())},
        "cache_growths": pruned.stats.growths, "rows_over_k": pruned.stats.rows_over_k,
        "tokens_per_s": {side: b * n / t for side, t in total.items()},
        "time": {side: {"total_s": t, "steps": len(segments[side]),
                        "median_step_s": statistics.median(segments[side])} for side, t in total.items()},
        "speedup_95ci_paired_bootstrap_over_steps": [paired.low, paired.high],
        "speedup_by_quarter_of_the_sequence": by_quarter,
        "kv_cache_bytes": kv, "kv_slots": {"pruned": pruned.stats.capacity, "full": full.stats.capacity},
        "kv_ratio_ideal": ideal_kv, "flop_model_tflops": {s: f / 1e12 for s, f in flops.items()},
        "speedup_vs_flop_model": speedup / model_speedup,
        "warmup": f"one decode per side of the same widths on a {scale.mergear_warmup_grid}^2 grid",
    }
    result = ItemResult(keys, details, goals)
    if not all(g.met for g in goals):
        # a quarter-length decode (same weights, first L/4 positions) of each side under the profiler
        q = build_model(preset, {**overrides, "grid": config.grid // 2}, device)
        state = {key: v[: q.config.num_tokens] if key == "merge_instruction.weight" else v
                 for key, v in model.state_dict().items()}
        q.load_state_dict(state)
        q_codes = codes[:, : q.config.num_tokens]
        q_kept = int(keep_by_code(q_codes).sum(1).max())
        result.profile = {f"{side} (first L/4 positions)":
                          profile_top(decode(side == "pruned", q, labels, q_codes, q_kept), device)
                          for side in ("pruned", "full")}
    return result
