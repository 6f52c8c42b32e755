"""Inference forms (prefill, then one token at a time from a state) against the causal forward over the whole
sequence, in float64 and in fp32 (the flash-attention rule against float64); state sizes against their formulas."""

import sys
import types

import pytest
import torch
from conftest import qkv

from racebench import make_planes, race_attention, race_generate
from racebench.errors import UnsupportedError, UsageError
from racebench.methods.registry import BuildConfig, decode_all, get_method, list_methods
from racebench.methods.softmax import softmax_naive

DECODERS = [m.name for m in list_methods() if m.decode is not None and "cpu" in m.devices]
B, H, D = 1, 2, 32


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# Decoding sums its state one token at a time, the forward in chunks: a few fp32 ulps apart, which a 1e-6 bar
# failed 1 seed in many (race-torch, prompt 1, 5 tokens: 1.9e-6 against the forward's 3.7e-7). A wrong state is off
# by far more than 1e-5.
TOL32 = 1e-5


def cfg_for(method: str, T: int, dtype: str, **knobs) -> BuildConfig:
    return BuildConfig(B, H, T, D, dtype, "cpu", causal=True, seed=int(torch.randint(1000, ())), knobs=knobs,
                       mode="decode")


def test_every_inference_method_is_covered():
    assert {"race", "race-torch", "flash", "linear", "performer"} <= set(DECODERS)


@pytest.mark.parametrize("prompt,tokens", [(1, 1), (1, 5), (1, 64), (63, 1), (63, 5), (63, 64), (1000, 1),
                                           (1000, 5), (1000, 64)])
@pytest.mark.parametrize("method,knobs", [(m, {}) for m in DECODERS] + [("race", {"race_normalize": "bucket"})],
                         ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())) or "defaults")
def test_decoded_outputs_equal_the_causal_forward(method, knobs, prompt, tokens):
    T = prompt + tokens
    m = get_method(method)
    q, k, v = qkv(B, H, T, D, dtype=torch.float64)
    cfg64 = cfg_for(method, T, "fp64", **knobs)
    want = m.reference(cfg64)(q, k, v)  # the causal definition, float64
    got64 = decode_all(m.decode(cfg64), q, k, v, prompt)
    assert rel(got64, want) < 1e-10
    cfg32 = BuildConfig(**{**cfg64.__dict__, "dtype": "fp32"})
    q32, k32, v32 = (x.float() for x in (q, k, v))
    got32 = decode_all(m.decode(cfg32), q32, k32, v32, prompt)
    forward32 = m.build(cfg32)(q32, k32, v32)  # the fp32 causal forward: its error is the bar
    assert got32.dtype == torch.float32
    assert rel(got32, want) <= 2 * rel(forward32, want) + TOL32
    assert rel(got32[..., prompt:, :], want[..., prompt:, :]) <= 2 * rel(forward32[..., prompt:, :],
                                                                          want[..., prompt:, :]) + TOL32


@pytest.mark.parametrize("path", ["auto", "torch"])  # auto: the native step on the CPU where it is built
@pytest.mark.parametrize("normalize", ["paper", "bucket"])
def test_race_generate_equals_race_attention(normalize, path, monkeypatch):
    from racebench.methods.race import generate, native

    if path == "torch":
        monkeypatch.setattr(generate, "native_step", lambda state, planes: False)
    elif not native.available():
        pytest.skip(f"native kernels not built here: {native.build_error()}")
    q, k, v = qkv(2, 3, 300, 64, dtype=torch.float64)
    planes = make_planes(3, 3, 64, seed=int(torch.randint(1000, ()))).double()
    kw = dict(beta=4.0, normalize=normalize)
    want = race_attention(q, k, v, planes, causal=True, **kw)
    for prompt in (1, 100, 300):
        assert rel(race_generate(q, k, v, planes, prompt_len=prompt, **kw), want) < 1e-10


@pytest.mark.parametrize("normalize", ["paper", "bucket"])
def test_prefill_state_from_the_core_equals_the_hashed_sum(normalize):
    """Without autograd the prefill takes its state from the causal core's own pass; with it, the prompt's keys
    are hashed again. Both give the same outputs and state, and the second stays differentiable."""
    from racebench.methods.race.generate import race_prefill

    q, k, v = qkv(2, 3, 150, 32, dtype=torch.float64)
    planes = make_planes(3, 3, 32, seed=int(torch.randint(1000, ()))).double()
    kw = dict(beta=4.0, normalize=normalize)
    with torch.no_grad():
        o1, s1 = race_prefill(q, k, v, planes, **kw)
    o2, s2 = race_prefill(q, k, v, planes, **kw)
    assert o2.requires_grad and not o1.requires_grad
    assert rel(o1, o2.detach()) < 1e-12 and rel(s1.A, s2.A) < 1e-12 and rel(s1.KV, s2.KV) < 1e-12


def test_race_generate_refuses_bad_prompt_lengths():
    q, k, v = qkv(1, 1, 10, 16)
    planes = make_planes(2, 2, 16)
    for bad in (0, 11, 2.5):
        with pytest.raises(UsageError, match="prompt_len"):
            race_generate(q, k, v, planes, beta=1.0, prompt_len=bad)


@pytest.mark.parametrize("T", [64, 1024])
def test_state_sizes_follow_their_formulas(T):
    q, k, v = qkv(B, H, T + 3, D, dtype=torch.float32)
    sizes = {}
    for method in ("race", "flash", "linear"):
        m = get_method(method)
        cfg = cfg_for(method, T, "fp32")
        decoder = m.decode(cfg)
        _, state = decoder.prefill(q[..., :T, :], k[..., :T, :], v[..., :T, :])
        for t in range(T, T + 3):
            decoder.step(state, q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :])
        sizes[method] = decoder.state_bytes(state)
    knobs = get_method("race").effective_knobs(cfg_for("race", T, "fp32"))
    S = knobs["race_L"] * 2 ** knobs["race_P"]
    assert sizes["race"] == B * H * S * (D + 1) * 4  # A [S] and KV [S, D] in fp32, whatever T
    assert sizes["flash"] == 2 * B * H * (T + 3) * D * 4  # K and V of every token so far
    assert sizes["linear"] == B * H * D * (D + 1) * 4  # elu+1 keeps D features


def test_methods_without_a_decode_form_are_unsupported():
    cfg = BuildConfig(1, 1, 64, 16, "fp32", "cpu", causal=True, mode="decode")
    with pytest.raises(UnsupportedError, match="angular has no decode form"):
        get_method("angular").check(cfg)
    assert get_method("race").supports(cfg) is None


def test_decode_and_prefill_sweeps(tmp_path):
    from racebench.bench.runner import run_sweep
    from racebench.bench.spec import build_spec
    from racebench.results.store import load_run

    common = dict(methods="race,flash,linear,angular", lengths="64,256", heads="1", head_dim="16", warmup="1",
                  repeats="2", time_budget="60s")
    run_sweep(build_spec(mode="decode", decode_tokens=5, **common), tmp_path / "decode")
    meta, df = load_run(tmp_path / "decode")
    assert meta["spec"]["causal"] is True and meta["spec"]["decode_tokens"] == 5
    ok = df[df.status == "ok"].set_index(["method", "T"])
    assert set(ok.index.get_level_values(0)) == {"race", "flash", "linear"}
    assert (ok.repeats == 5).all() and (ok.decode_tokens == 5).all()  # one sample per decoded token
    assert (ok.time_ms > 0).all() and (ok.prefill_ms > 0).all() and (ok.peak_mem_bytes > 0).all()
    assert ok.loc[("flash", 256), "state_bytes"] == 2 * 1 * (256 + 5) * 16 * 4  # K, V of every token
    assert ok.loc[("race", 64), "state_bytes"] == ok.loc[("race", 256), "state_bytes"]  # fixed size
    assert ok.loc[("flash", 64), "floor_bytes"] == 4 * (64 + 5) * 16 * 4  # q, k, v, o of prompt and tokens
    assert "angular has no decode form" in df[df.method == "angular"].error.iloc[0]
    assert ok.loc[("race", 64), "impl"] in ("torch + cpp steps", "torch + torch steps")  # prefill, then the steps
    run_sweep(build_spec(mode="prefill", **common), tmp_path / "prefill")
    _, df = load_run(tmp_path / "prefill")
    ok = df[df.status == "ok"]
    assert (ok.repeats == 2).all() and (ok.prefill_ms == ok.time_ms).all() and ok.decode_tokens.isna().all()


@pytest.mark.parametrize("args,message", [
    (["--mode", "decode", "--non-causal"], "--mode decode is causal inference"),
    (["--decode-tokens", "5"], "--decode-tokens applies to --mode decode"),
    (["--mode", "decode", "--decode-tokens", "0"], "--decode-tokens must be positive"),
])
def test_bad_inference_options(args, message):
    from typer.testing import CliRunner

    from racebench.cli import app

    result = CliRunner().invoke(app, ["sweep", "--methods", "race", "--lengths", "64", *args])
    assert result.exit_code == 2 and message in result.output, result.output


CAUSAL = [m.name for m in list_methods() if m.causal and "cpu" in m.devices and "fp64" in m.devices["cpu"]
          and m.availability("cpu") is None]


@pytest.mark.parametrize("method", CAUSAL)
def test_causal_outputs_never_depend_on_later_tokens(method):
    """Every causal method: changing the last keys and values (large, as outliers are) leaves earlier outputs as
    they were. (Performer's per-head key shift once failed this: one large key in 64 moved earlier outputs by 1.36.)"""
    m = get_method(method)
    cfg = BuildConfig(1, 2, 64, 16, "fp64", "cpu", causal=True, seed=int(torch.randint(1000, ())))
    q, k, v = qkv(1, 2, 64, 16)
    attend = m.build(cfg)
    before = attend(q, k, v).detach()
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[..., -4:, :] = k2[..., -4:, :] * 6 + 3
    v2[..., -4:, :] = v2[..., -4:, :] * 6 - 3
    after = attend(q, k2, v2).detach()
    assert (after[..., :-4, :] - before[..., :-4, :]).abs().max() < 1e-12


class FakeFlashAttn(types.ModuleType):
    """flash-attn's documented contract in plain PyTorch, for the CPU: [B, T, H, D] tensors; flash_attn_with_kvcache
    writes k, v into the caches at position cache_seqlens in place, then attends over the caches up to them."""

    def __init__(self):
        super().__init__("flash_attn")
        self.calls = 0

    @staticmethod
    def flash_attn_func(q, k, v, causal=False):
        return softmax_naive(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False):
        self.calls += 1
        t, n = cache_seqlens, k.shape[1]
        k_cache[:, t:t + n], v_cache[:, t:t + n] = k, v
        K, V = k_cache[:, :t + n], v_cache[:, :t + n]
        return softmax_naive(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2)).transpose(1, 2), None


@pytest.mark.parametrize("module", ["flash_attn", "flash_attn_interface"])
@pytest.mark.parametrize("prompt,tokens,room", [(1, 5, 0), (63, 64, 0), (63, 5, 64)])
def test_flash_attn_kvcache_decoder_keeps_its_cache(monkeypatch, module, prompt, tokens, room):
    """flash and flash3 decode through flash_attn_with_kvcache where installed (CUDA). Against a stand-in of its
    contract: the decoder's layout, the cache's positions and its doubling when full (room 0: no token fits)."""
    from racebench.methods.softmax import _kvcache_decoder

    fake = FakeFlashAttn()
    monkeypatch.setitem(sys.modules, module, fake)
    q, k, v = (x.detach() for x in qkv(2, 3, prompt + tokens, 16))
    cfg = BuildConfig(2, 3, prompt, 16, "fp64", "cpu", causal=True, mode="decode", decode_tokens=room)
    got = decode_all(_kvcache_decoder(cfg, module), q, k, v, prompt)
    assert rel(got, softmax_naive(q, k, v, causal=True)) < 1e-12 and fake.calls == tokens
    decoder = _kvcache_decoder(cfg, module)
    _, cache = decoder.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :])
    assert decoder.state_bytes(cache) == 2 * 2 * 3 * prompt * 16 * 8


def test_sdpa_backends_decode_under_their_backend():
    """sdpa-math (the backend the CPU has) decodes like flash; sdpa-efficient and sdpa-cudnn share its code on CUDA."""
    assert "sdpa-math" in DECODERS
    assert all(get_method(m).decode is not None for m in ("sdpa-efficient", "sdpa-cudnn", "flash3"))
